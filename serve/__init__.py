"""The Ray Serve try-on application (``serve/app.py``) and its config (``serve/config.yaml``)."""
