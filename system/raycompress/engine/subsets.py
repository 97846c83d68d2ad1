"""Named row subsets of the calibration set, for statistics kept apart by source.

MixCal keeps "domain" and "general" statistics (H = H_domain + λ·H_general); Cus-Prun keeps one
per dimension (language, domain, task, ...). Each subset is a (n,) bool mask over the calibration
rows, from each row's source name (the `source` column of calibration.parquet).
"""
from __future__ import annotations

import torch

from raycompress.config import CompressConfig


def row_subsets(cfg: CompressConfig, sources: list[str]) -> dict[str, torch.Tensor]:
    """Subset name -> (n,) bool mask over calibration rows; {} when the recipe keeps no subsets.

    Raises:
        ValueError: a Cus-Prun dimension has no calibration row (names the dimension and sources).
    """
    if cfg.mixcal is not None:
        general = torch.tensor([s in cfg.mixcal.general_sources for s in sources], dtype=torch.bool)
        return {"domain": ~general, "general": general}
    if cfg.cus_prun is None:
        return {}
    out = {}
    for dim, srcs in sorted(cfg.cus_prun.dimensions.items()):
        mask = torch.tensor([s in srcs for s in sources], dtype=torch.bool)
        if not mask.any():
            raise ValueError(f"compress.cus_prun.dimensions.{dim}: no calibration sequence comes from {srcs} "
                             f"(sources present: {sorted(set(sources))})")
        out[dim] = mask
    return out
