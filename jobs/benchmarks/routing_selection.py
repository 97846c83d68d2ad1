"""Routing-aware selection against plain ZipCal and random on one token budget; prints ONE JSON line.

    .venv/bin/python jobs/benchmarks/routing_selection.py [--n-samples 16] [--seq-len 128]
        [--min-tokens 400] [--beta 16] [--probe-layers 2] [--seed 0] [--docs 0] [--output DIR] [--smoke]

The work folder (the saved tiny model) is --output, else a new temporary folder. --smoke: the
first 60 documents, 4 windows of 32 tokens, min_tokens_per_expert 16, no min_tokens sweep.

Model: a tiny random Qwen3-MoE built from `Qwen3MoeConfig` (hidden 64, 8 experts, top-2,
moe_intermediate 32, 2 layers, vocabulary of the smoke job's tokenizer `jobs/models/smoke-llama`),
saved in the work folder and probed through `router_probe.load_probe`, as a select actor would.
Corpus: the shipped biomedical pool (`data/corpora/biomed_pubmedqa_pool.jsonl`, PubMedQA
abstracts, see data/PROVENANCE.md; `--docs N` keeps the first N documents), packed into windows
of `--seq-len` tokens by the select stage's own `ShardSelector.windows`. All three methods choose
`--n-samples` windows from that one pool (budget n_samples x seq_len tokens), single process:
- routing_aware: `selection/routing.py` ("routing" local round, min_tokens_per_expert, beta);
- zipcal: the "zipcal" local round; random: the "random" bottom-k local round.
Per method: experts_reached (by the pool, per probed layer x expert), starved_experts (reached
experts with fewer than min_tokens_per_expert routed tokens from the chosen windows),
tokens_per_expert_min (over reached experts), concepts_covered (ZipCal's lexical coverage), and
perplexity_after_compression: null (compressing and evaluating the MoE is outside this benchmark).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs" / "benchmarks"))
from _common import emit, offline, skipped, work_folder  # noqa: E402

CORPUS = ROOT / "data/corpora/biomed_pubmedqa_pool.jsonl"
TOKENIZER = ROOT / "jobs/models/smoke-llama"
SWEEP = (64, 256, 400, 450)  # min_tokens_per_expert also reported (mean share at the defaults: 512)
PPL_NOTE = ("not measured by this benchmark (selection coverage only): compressing the tiny MoE with each "
            "chosen set and evaluating it belongs to the MoE benchmark, jobs/benchmarks/moe.py")


def tiny_moe(folder: Path, seed: int = 0) -> Path:
    """A random Qwen3-MoE (hidden 64, 8 experts, top-2, moe_intermediate 32, 2 layers) saved with
    the smoke tokenizer in `folder`."""
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER, trust_remote_code=False)
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    Qwen3MoeForCausalLM(cfg).eval().save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    return folder


def pool_windows(folder: Path, seq_len: int, docs: int):
    """The biomedical pool's candidate windows, built by the select stage's ShardSelector."""
    from raycompress.selection.base import SelectContext
    from raycompress.selection.shard import ShardSelector

    rows = [json.loads(line) for line in CORPUS.read_text().split("\n") if line.strip()]
    rows = rows[:docs] if docs else rows
    sel = ShardSelector(str(folder), seq_len, "zipcal", 1, SelectContext(seed=0))
    return sel.windows([(i, str(r["id"]), r["text"]) for i, r in enumerate(rows)], "biomed", CORPUS.name, 0)


def compare(windows, counts, n: int, min_tokens: int, beta: float, seed: int) -> dict:
    """{method: figures} for routing_aware, zipcal and random on the same pool and budget;
    `counts` (n_windows, layers, experts) are the pool's routed tokens (probed once)."""
    import raycompress.selection.routing as routing
    from raycompress.registry import SELECTORS
    from raycompress.selection.base import SelectContext
    from raycompress.selection.zipcal import coverage

    index = {w.uid: i for i, w in enumerate(windows)}
    ctx = SelectContext(seed=seed, extra={"route_fn": _unused, "min_tokens_per_expert": min_tokens, "beta": beta,
                                          "routing_counts": {w.uid: counts[i] for i, w in enumerate(windows)}})
    picks = {"routing_aware": routing.local(list(windows), n, ctx, "pool"),
             "zipcal": SELECTORS.get("zipcal").local(list(windows), n, SelectContext(seed=seed), "pool"),
             "random": SELECTORS.get("random").local(list(windows), n, SelectContext(seed=seed), "pool")}
    out = {}
    for name, chosen in picks.items():
        idx = [index[w.uid] for w in chosen]
        stats = routing.coverage_of(counts, idx, min_tokens, k=n).summary()
        out[name] = {**{k: stats[k] for k in ("starved_experts", "tokens_per_expert_min", "experts_reached",
                                              "feasible", "starved", "tokens")},
                     "windows": len(idx), "concepts_covered": coverage([w.concepts for w in windows], idx),
                     "perplexity_after_compression": None, "perplexity_note": PPL_NOTE}
    return out


def _brief(min_tokens: int, result: dict) -> dict:
    keep = ("starved_experts", "tokens_per_expert_min", "feasible")
    return {"min_tokens_per_expert": min_tokens, **{k: {f: v[f] for f in keep} for k, v in result.items()}}


def _unused(windows):
    raise AssertionError("the pool's routed tokens are probed once, before the comparison")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--min-tokens", type=int, default=400,
                    help="min_tokens_per_expert (the mean share at the defaults is 512)")
    ap.add_argument("--beta", type=float, default=16.0)
    ap.add_argument("--probe-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", type=int, default=0, help="first N documents of the pool (0: all)")
    ap.add_argument("--output", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="60 documents, 4 windows of 32 tokens, m = 16")
    args = ap.parse_args(argv)
    if args.smoke:
        args.docs, args.n_samples, args.seq_len, args.min_tokens = 60, 4, 32, 16
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    offline()
    work = work_folder(args.output, "routing")
    # libraries that log to stdout (DeepSpeed's accelerator notice) go to stderr: stdout is the JSON line
    with contextlib.redirect_stdout(sys.stderr):
        from raycompress.selection.router_probe import load_probe

        folder = work / "tiny-qwen3-moe"
        if not (folder / "config.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            tiny_moe(folder, args.seed)
        windows = pool_windows(folder, args.seq_len, args.docs)
        counts = load_probe(folder, args.probe_layers, device="cpu", batch=64)([w.input_ids for w in windows])
        result = compare(windows, counts, args.n_samples, args.min_tokens, args.beta, args.seed)
        result["min_tokens_sweep"] = skipped("--smoke") if args.smoke else [
            _brief(m, compare(windows, counts, args.n_samples, m, args.beta, args.seed))
            for m in SWEEP if m != args.min_tokens]
    result["config"] = {"model": "tiny random Qwen3-MoE (hidden 64, 8 experts, top-2, 2 layers)",
                        "corpus": str(CORPUS.relative_to(ROOT)), "documents": args.docs or "all",
                        "candidate_windows": len(windows), "n_samples": args.n_samples, "seq_len": args.seq_len,
                        "token_budget": args.n_samples * args.seq_len, "min_tokens_per_expert": args.min_tokens,
                        "beta": args.beta, "probe_layers": args.probe_layers, "seed": args.seed,
                        "smoke": args.smoke}
    emit(result)
    return result


if __name__ == "__main__":
    main()
