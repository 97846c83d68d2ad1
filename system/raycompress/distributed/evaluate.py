"""Evaluate stage on Ray: a pool of `EvalActor`s, each loading one checkpoint once and scoring
chunks of requests; the driver only tokenizes and aggregates. Dense and compressed models are
scored one after the other with the same requests."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
from ray.util import ActorPool
from tqdm import tqdm

from raycompress.config import JobConfig
from raycompress.distributed.resources import actor_options, torch_threads
from raycompress.evaluation.tasks import finalize_task, prepare_task

log = logging.getLogger(__name__)


@ray.remote
class EvalActor:
    """Holds one model; scores work units. All maths is in `evaluation.scoring`."""

    def __init__(self, model_dir: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def score(self, kind: str, requests: list, batch_tokens: int) -> list:
        from raycompress.evaluation.scoring import score_requests

        return score_requests(self.model, kind, requests, self.max_len, batch_tokens)


def _chunks(prepared, windows: int = 8, pairs: int = 64):
    """Work units (task index, kind, requests): `windows` perplexity windows or `pairs` MC requests."""
    for t, prep in enumerate(prepared):
        step = pairs if prep.kind == "ll" else windows
        for i in range(0, len(prep.requests), step):
            yield t, prep.kind, prep.requests[i : i + step]


def evaluate_models(job: JobConfig, models: dict[str, Path]) -> dict:
    """Score every task on every model; returns {model label: {task: metrics, "_seconds": s}}.

    Raises:
        FileNotFoundError: a model folder or task file is missing.
    """
    from transformers import AutoTokenizer

    first = next(iter(models.values()))
    tokenizer = AutoTokenizer.from_pretrained(first)
    prepared = [prepare_task(job, t, tokenizer) for t in job.evaluate.tasks]
    units = list(_chunks(prepared))
    opts = actor_options(job.ray)
    out: dict[str, dict] = {}
    for label, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"model '{label}': {path} has no config.json")
        t0 = time.perf_counter()
        actors = [EvalActor.options(**opts).remote(str(path), torch_threads(job.ray)) for _ in range(job.ray.eval_actors)]
        pool = ActorPool(actors)
        results: list[list] = [[] for _ in prepared]
        fn = lambda a, u: a.score.remote(u[1], u[2], job.evaluate.batch_tokens)  # noqa: E731
        for unit, res in tqdm(zip(units, pool.map(fn, units)), total=len(units), desc=f"evaluate[{label}]"):
            results[unit[0]].extend(res)
        for a in actors:
            ray.kill(a)
        out[label] = {p.cfg.name: finalize_task(p, r) for p, r in zip(prepared, results)}
        out[label]["_seconds"] = time.perf_counter() - t0
    return out
