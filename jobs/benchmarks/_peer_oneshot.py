"""Benchmark peer: run llm-compressor's ``oneshot`` on exactly our calibration token sequences.

Runs inside ``.venv-peer`` (``make peer-env``), never inside the main ``.venv``, and imports
nothing from raycompress: the peer must stand on its own so that its numbers are its own.

    .venv-peer/bin/python jobs/benchmarks/_peer_oneshot.py --model DIR \
        --calibration calib.parquet --algorithm sparsegpt --sparsity 0.5 --output OUT

``--calibration`` is a Parquet file with a column ``input_ids`` (list<int32>), one calibration
sequence per row, all rows the same length. Prints ONE JSON line on stdout:
``{"algorithm", "wall_s", "peak_rss_mb", "output"}`` (``wall_s`` times ``oneshot`` only;
``peak_rss_mb`` is this process's ``ru_maxrss``). llm-compressor's own log goes to stderr.
"""

from __future__ import annotations

import os

# Nothing may download from a hub; set before transformers / datasets / llmcompressor import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ALGORITHMS = ("sparsegpt", "wanda", "gptq_w4g64")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="local Hugging Face model folder")
    p.add_argument("--calibration", required=True, type=Path, help="Parquet with input_ids rows")
    p.add_argument("--algorithm", required=True, choices=ALGORITHMS)
    p.add_argument("--sparsity", type=float, default=0.5, help="pruning only (default 0.5)")
    p.add_argument("--output", required=True, type=Path, help="folder for the compressed model")
    return p.parse_args(argv)


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_calibration(path: Path):
    import pyarrow.parquet as pq
    from datasets import Dataset

    table = pq.read_table(path, columns=["input_ids"])
    rows = [list(map(int, r)) for r in table.column("input_ids").to_pylist()]
    if not rows:
        raise SystemExit(f"{path}: no calibration rows")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise SystemExit(f"{path}: calibration rows differ in length: {sorted(lengths)}")
    seq_len = lengths.pop()
    if seq_len == 0:
        raise SystemExit(f"{path}: empty calibration rows")
    # A Dataset that already has `input_ids` is used as-is by llm-compressor (no tokenization).
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})
    return ds, len(rows), seq_len


def _recipe(algorithm: str, sparsity: float):
    ignore = ["re:.*lm_head"]
    if algorithm == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        # 50% unstructured ("0:0"); default dampening_frac / block_size.
        return SparseGPTModifier(
            sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=ignore
        )
    if algorithm == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(
            sparsity=sparsity, mask_structure="0:0", targets=["Linear"], ignore=ignore
        )
    if algorithm == "gptq_w4g64":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.gptq import GPTQModifier

        # W4A16 with group size 64: symmetric int4 weights, activations untouched.
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=4, type="int", symmetric=True, strategy="group", group_size=64
            ),
        )
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)
    raise ValueError(algorithm)


class _NoProcessor:
    """Stand-in when the model folder has no tokenizer: the dataset is pre-tokenized, and
    oneshot only needs a processor object to exist (and to save it next to the model)."""

    def save_pretrained(self, *_args, **_kwargs) -> None:
        return None


def _claim_stdout():
    """Route everything written to fd 1 to stderr and return a private handle on the real
    stdout. llm-compressor's loguru console sink writes to sys.stdout (captured at import),
    and our contract is exactly one JSON line on stdout."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return real


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = _claim_stdout()
    if args.algorithm != "gptq_w4g64" and not 0.0 < args.sparsity < 1.0:
        raise SystemExit(f"--sparsity must be in (0, 1), got {args.sparsity}")

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    dataset, n_rows, seq_len = _load_calibration(args.calibration)

    model = AutoModelForCausalLM.from_pretrained(
        str(args.model), dtype=torch.float32, local_files_only=True
    )
    model.to("cpu").eval()
    try:
        processor = AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: run without one
        print(f"[peer] no tokenizer in {args.model} ({exc!r}); continuing without", file=sys.stderr)
        processor = _NoProcessor()

    pruning = args.algorithm in ("sparsegpt", "wanda")
    args.output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        processor=processor,
        dataset=dataset,
        recipe=_recipe(args.algorithm, args.sparsity),
        num_calibration_samples=n_rows,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
        # Dense checkpoints for pruning, so that a stock transformers loads them; GPTQ keeps
        # the compressed-tensors (pack-quantized) format.
        save_compressed=not pruning,
    )
    wall_s = time.perf_counter() - t0

    # oneshot's own save only happens with output_dir; save here so that timing is oneshot only.
    model.save_pretrained(str(args.output), save_compressed=not pruning)
    if not isinstance(processor, _NoProcessor):
        processor.save_pretrained(str(args.output))

    print(
        json.dumps(
            {
                "algorithm": args.algorithm,
                "wall_s": round(wall_s, 3),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "output": str(args.output.resolve()),
            }
        ),
        file=out,
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
