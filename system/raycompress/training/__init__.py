"""Sparse-preserving training without Ray: weight masks, the loop with optional GMP, the strategies
(DDP, DeepSpeed ZeRO) behind one interface, one rank's session, checkpoints and the memory model;
the Ray Train shell is `distributed.train_workers`."""
