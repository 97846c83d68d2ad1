"""Train stage: sparse-preserving continued pretraining (Sparse*BERT's sparse transfer, Zafrir et
al. / Kurtic et al. 2022) of the compressed model on domain text, with Ray Train.

The stream: the select stage's readers (`select.source_docs`) on `train.sources`, usable documents
only, tokenized and packed into (seq_len,) rows on Ray Data, split across the `TorchTrainer`
workers (`distributed.train_workers`, over `training.session`). The start: `compress/model` (its
exact zeros become the fixed mask) or, with `train.init: dense`, the dense model (for GMP from dense). The output:
`train/model` in the compress stage's format and manifest, so `evaluate` and the report take it
unchanged, and `train/summary.json`. Ray Train writes its checkpoints under `train/runs` (the job's
output location, so any node may resume); a rerun after a dead driver resumes from the newest.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from raycompress.config import JobConfig
from raycompress.models.fetch import ModelRef
from raycompress.storage import uri

log = logging.getLogger(__name__)

RUN_NAME = "train"


class _Packer:
    """Ray Data batch fn (a class: the tokenizer loads once per worker): usable documents ->
    {"input_ids": (n_rows, seq_len) int64}, documents joined with EOS in order; each batch's
    tail shorter than seq_len is dropped."""

    def __init__(self, model: ModelRef, seq_len: int) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model.local(weights=False), trust_remote_code=False)
        self.seq_len = seq_len

    def __call__(self, batch: dict) -> dict:
        from raycompress.training.loop import pack_tokens

        texts = [str(t) for t, r in zip(batch["text"], batch["reason"]) if r == ""]
        ids = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        rows = pack_tokens(ids, self.seq_len, self.tok.eos_token_id)
        return {"input_ids": rows.numpy() if len(rows) else np.zeros((0, self.seq_len), dtype=np.int64)}


def training_dataset(job: JobConfig, model: ModelRef):
    """A Ray Data dataset of packed rows ("input_ids": (seq_len,) int64) from `train.sources`
    (all select sources when empty), each source capped at `train.max_docs` records (skipped
    ones, counted by the select stage, included)."""
    from raycompress.data.readers import expand_paths
    from raycompress.distributed.select import source_docs

    t = job.train
    parts = []
    for name in t.sources or sorted(job.select.sources):
        # no CPU reservations: the Ray Train workers hold the CPUs, and a pipeline waiting for one
        # of theirs would never feed them
        docs = source_docs(job, name, expand_paths(job.select.sources[name].path, Path(job.base_dir)),
                           parse_cpus=0)
        parts.append(docs.limit(t.max_docs) if t.max_docs else docs)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(_Packer, fn_constructor_args=(model, t.seq_len), batch_size=512,
                          batch_format="numpy", concurrency=1, num_cpus=0)


def check_train(job: JobConfig) -> None:
    """Before Ray starts: what the train section asks must be possible.

    Raises:
        ValueError: training would start from a quantized checkpoint (`compress.quant` or `scheme` set and
            `train.init: compressed`), or `train.strategy: deepspeed` without DeepSpeed installed.
    """
    import importlib.util

    t = job.train
    if t is None:
        return
    if t.init == "compressed" and job.compress.quantized:
        raise ValueError(f"train: compress.quant or compress.scheme is set ({job.compress.algorithm}), so compress writes a quantized "
                         "checkpoint, which train cannot update with its sparsity mask held; train a pruned "
                         "(unquantized) checkpoint, or set train.init: dense")
    if t.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("train.strategy: deepspeed needs DeepSpeed on every node: pip install 'raycompress[train]' "
                         "(or use train.strategy: ddp)")


def start_model(job: JobConfig, model: ModelRef, out_dir: str) -> ModelRef:
    """The checkpoint training starts from: compress/model, or the dense model (`train.init: dense`)."""
    if job.train.init == "dense":
        return model
    return ModelRef(uri.join(out_dir, "compress", "model"), job.storage.cache_dir)


def _gmp_summary(job: JobConfig) -> dict | None:
    """The summary's (and the report's) short names of the `train.gmp` schedule (eq. 1's symbols)."""
    g = job.train.gmp
    if g is None:
        return None
    return {"s_i": g.initial_sparsity, "s_f": g.final_sparsity, "t0": g.start_step, "n": g.n_prunes,
            "dt": g.interval, "scope": g.scope}


def latest_checkpoint(runs_dir: str) -> str | None:
    """The newest checkpoint (highest recorded step) a Ray Train run of this stage left under
    `runs_dir/RUN_NAME`, or None."""
    import pyarrow.fs as pafs

    fs, root = uri.resolve(uri.join(runs_dir, RUN_NAME))
    best, best_step = None, -1
    # Ray Train v2 keeps checkpoint_* folders directly under the run, v1 one level deeper
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True)):
        folder = info.path.rsplit("/", 1)[0]
        if info.base_name == "state.json" and folder.rsplit("/", 1)[-1].startswith("checkpoint_"):
            with fs.open_input_stream(info.path) as f:
                step = json.loads(f.read())["step"]
            if step > best_step:
                best, best_step = folder, step
    if best is None:
        return None
    return uri.join(runs_dir, RUN_NAME, best[len(root):].lstrip("/"))


def _runs_for(runs: str, inputs: dict) -> str | None:
    """The checkpoint to resume from, if the Ray Train runs under `runs` were made for `inputs`
    (the stage's inputs, `guard.stage_inputs`); runs made for other inputs are deleted first."""
    marker = uri.join(runs, "inputs.json")
    if uri.is_file(marker) and json.loads(uri.read_text(marker)) != inputs:
        log.warning("train: %s holds checkpoints of a different job; deleting them", uri.display(runs))
        uri.delete_dir(runs)
    resume = latest_checkpoint(runs) if uri.is_file(marker) else None
    uri.write_text(marker, json.dumps(inputs, sort_keys=True))
    return resume


def run_train(job: JobConfig, model: ModelRef, out_dir: str, inputs: dict | None = None) -> dict:
    """Train `start_model` on the domain stream; writes `out_dir/train/model` and `summary.json`.
    A rerun resumes from the newest checkpoint under `train/runs` when it was made for the same
    `inputs` (what the stage depends on).

    Returns:
        the summary: steps, tokens, seconds, final loss, sparsity at the start and the end
        (fractions of the target linears' weights), strategy and workers.
    Raises:
        StageFailed-style RuntimeError: the Ray Train run failed (its error is chained).
    """
    from raycompress.distributed.train_workers import TrainRun, make_trainer

    t, stage_dir = job.train, uri.join(out_dir, "train")
    runs = uri.join(stage_dir, "runs")
    resume = _runs_for(runs, inputs or {})
    if resume:
        log.info("train: resuming from %s", uri.display(resume))
    run = TrainRun(t, start_model(job, model, out_dir), output_dir=uri.join(stage_dir, "model"), resume_from=resume)
    started = time.perf_counter()
    trainer = make_trainer(run, training_dataset(job, model), runs, RUN_NAME)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"train: the Ray Train run failed: {result.error}") from result.error
    m = result.metrics
    summary = {"steps": m["step"], "tokens": m["step"] * t.batch_size * t.num_workers * t.seq_len,
               "seconds": round(time.perf_counter() - started, 2), "final_loss": m["loss"],
               "sparsity_start": m["sparsity_start"], "sparsity": m["sparsity"], "strategy": t.strategy,
               "num_workers": t.num_workers, "init": t.init, "gmp": _gmp_summary(job)}
    uri.write_text(uri.join(stage_dir, "summary.json"), json.dumps(summary, indent=2))
    log.info("train: %d steps, %d tokens, loss %.4f, sparsity %.4f -> %.4f", summary["steps"], summary["tokens"],
             m["loss"], m["sparsity_start"], m["sparsity"])
    return summary
