"""The per-layer compression lifecycle (load, capture, accumulate, solve, persist, free); no Ray."""
