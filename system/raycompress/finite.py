"""The project's one NaN/Inf check, torch-only so that both the solvers (`algorithms/`, pure
tensor maths) and the checkpoint reader and writer (`models/`) use it without depending on each
other. It imports nothing from raycompress.
"""
from __future__ import annotations

import torch


def count_nonfinite(t: torch.Tensor, rows: int = 512) -> int:
    """NaN and Inf values in `t` (any shape; 0 for integer, bool and empty tensors), counted
    `rows` leading-dimension rows at a time: torch.isfinite on the whole of a (28672, 28672)
    Hessian would allocate about 1.75x its size in temporaries. 8-bit float tensors (FP8 weights
    and scales, which torch's isfinite does not take) are checked in bfloat16, which holds them exactly."""
    if not (t.is_floating_point() or t.is_complex()) or not t.numel():
        return 0
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    wide = (lambda x: x.to(torch.bfloat16)) if t.element_size() == 1 else (lambda x: x)
    return sum(int((~torch.isfinite(wide(flat[a:a + rows]))).sum()) for a in range(0, flat.shape[0], rows))
