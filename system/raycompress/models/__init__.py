"""Model facts and weight I/O: architecture table, meta skeleton, per-layer safetensors, checkpoint writing."""
