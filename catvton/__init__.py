"""CatVTON-Flux try-on fine-tuning on DeepFashion with Ray: the library (no Ray job code here)."""
