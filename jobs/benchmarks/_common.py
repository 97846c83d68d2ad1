"""What every benchmark shares: job files read with the project's loader (paths resolve against the
job file's folder wherever the benchmark writes its copy), a work folder anywhere (`--output` or a
fresh temporary folder), output folders claimed the way raycompress claims them, and the `--smoke`
job (the tiny random Llama of `jobs/smoke.yaml`, fewest tokens, one actor per stage).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOKE_JOB = REPO / "jobs" / "smoke.yaml"


def offline() -> None:
    """Nothing downloads: the Hugging Face libraries in this process and its children stay offline."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def job_mapping(job_file: Path) -> dict:
    """The job file as a mapping that can be written anywhere: validated by
    `raycompress.config.load_config`, with `base_dir` set to what the loader resolves the file's
    relative paths against (its own folder), so a copy under a work folder reads the same files.

    Raises:
        ConfigError: the job file is missing or does not validate (names file and field).
    """
    import yaml

    from raycompress.config import load_config

    job = load_config(job_file)
    raw = yaml.safe_load(Path(job_file).read_text())
    raw["base_dir"] = job.base_dir
    return raw


def absolute_paths(raw: dict) -> dict:
    """A copy of the job mapping whose model folder, corpus paths and task folders are absolute
    (made so by `JobConfig.resolve` against its `base_dir`), for readers that re-root relative
    paths (a sweep's base job resolves against the sweep file's folder)."""
    from raycompress.config import JobConfig

    job = JobConfig.model_validate(raw)
    prefix = "random:" if job.model.startswith("random:") else ""
    model = job.model.removeprefix(prefix)
    local = "://" not in model and (Path(job.base_dir) / model).expanduser().exists()
    sources = {k: {**v, "path": job.resolve(v["path"])} for k, v in raw["select"]["sources"].items()}
    evaluate = {**raw.get("evaluate", {}), "task_dirs": [job.resolve(d) for d in job.evaluate.task_dirs]}
    return {**raw, "model": prefix + (job.resolve(model) if local else model),
            "select": {**raw["select"], "sources": sources}, "evaluate": evaluate}


def write_job(path: Path, raw: dict) -> Path:
    """`raw` as YAML at `path` (parents made); returns `path`."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def work_folder(output: Path | None, prefix: str) -> Path:
    """`output` (made if missing), else a new temporary folder named after the benchmark."""
    if output is None:
        return Path(tempfile.mkdtemp(prefix=f"raycompress-{prefix}-"))
    output.mkdir(parents=True, exist_ok=True)
    return output


def claim(out: Path) -> Path:
    """A new output folder made ours (`distributed.guard.claim_output`'s marker) before a benchmark
    seeds it with an earlier stage's files, as `raycompress` would have made it."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        from raycompress.distributed.guard import claim_output
    except ImportError:  # a tree from before output folders were claimed
        return out
    claim_output(str(out))
    return out


def smoke_job(n_samples: int = 4, seq_len: int = 32, eval_tokens: int = 256) -> dict:
    """`jobs/smoke.yaml` made as small as a run can be: `n_samples` × `seq_len` calibration
    tokens, one capped perplexity task, one actor per stage."""
    raw = job_mapping(SMOKE_JOB)
    raw["name"] = "bench-smoke"
    raw["select"].update(n_samples=n_samples, seq_len=seq_len)
    raw["evaluate"] = {"tasks": [{"name": "biomed_abstracts", "max_tokens": eval_tokens, "max_length": seq_len}]}
    raw["ray"] = {"num_cpus": 2, "compress_actors": 1, "eval_actors": 1, "select_actors": 1, "cpus_per_actor": 1}
    return raw


def skipped(reason: str, **extra) -> dict:
    """The JSON of a benchmark (or part) that did not run here, and why."""
    return {"skipped": reason, **extra}


def emit(result: dict) -> None:
    """The benchmark's ONE JSON line on stdout."""
    print(json.dumps(result), flush=True)
