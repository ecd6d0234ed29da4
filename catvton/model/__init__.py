"""Loading the FLUX Fill base (hub id or folder) and the offline tiny base."""
