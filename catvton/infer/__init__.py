"""The try-on pipeline: person + garment (+ mask) -> image."""
