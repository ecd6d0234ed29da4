"""DeepFashion rows -> validated rows -> try-on pairs -> canvases (see docs/architecture.md)."""
