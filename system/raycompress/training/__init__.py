"""Sparse-preserving training: weight masks, a pure-PyTorch train loop with optional GMP, and a Ray Train shell."""
