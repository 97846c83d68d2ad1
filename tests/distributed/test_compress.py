"""distributed.compress under a local Ray: 1 and 2 actors write byte-identical checkpoints, and a
killed actor is replaced and the job resumes to the same bytes."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raycompress.config import JobConfig
from raycompress.distributed.compress import run_compress


def _job(model_dir, actors, algorithm="sparsegpt", **compress):
    return JobConfig.model_validate({
        "model": str(model_dir), "select": {"sources": {"x": {"path": "unused"}}},
        "compress": {"algorithm": algorithm, **compress}, "evaluate": {"tasks": []},
        "ray": {"compress_actors": actors, "cpus_per_actor": 0.5, "torch_threads": 1}})


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calibration.parquet"
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    pq.write_table(pa.table({"input_ids": pa.array(ids.tolist(), pa.list_(pa.int32()))}), path)
    return path


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted((out / "model").glob("*.safetensors"))}


@pytest.mark.parametrize("algorithm,extra", [("sparsegpt", {}), ("wanda", {"n_m": [2, 4]}), ("gptq", {"quant": {"bits": 4, "group_size": 32}})])
def test_one_and_two_actors_identical(tiny_llama_dir, calib, tmp_path, ray_local, algorithm, extra):
    outs = []
    for k in (1, 2):
        run_compress(_job(tiny_llama_dir, k, algorithm, **extra), tiny_llama_dir, calib, tmp_path / f"k{k}", "fp")
        outs.append(_shards(tmp_path / f"k{k}"))
    assert outs[0] == outs[1] and len(outs[0]) == 3


def test_killed_actor_resumes_to_same_bytes(tiny_llama_dir, calib, tmp_path, ray_local, monkeypatch):
    ref = tmp_path / "ref"
    run_compress(_job(tiny_llama_dir, 2), tiny_llama_dir, calib, ref, "fp")
    monkeypatch.setenv("RAYCOMPRESS_CHAOS_KILL_LAYER", "1")
    monkeypatch.setenv("RAYCOMPRESS_CHAOS_MARKER", str(tmp_path / "killed"))
    out = tmp_path / "chaos"
    result = run_compress(_job(tiny_llama_dir, 2), tiny_llama_dir, calib, out, "fp")
    assert (tmp_path / "killed").exists() and result["restarts"] == 1
    assert _shards(out) == _shards(ref)
    assert json.loads((out / "progress.json").read_text())["done"] == [0, 1]


def test_rerun_with_other_fingerprint_refuses(tiny_llama_dir, calib, tmp_path, ray_local):
    from raycompress.engine.pipeline import FingerprintMismatch

    run_compress(_job(tiny_llama_dir, 1), tiny_llama_dir, calib, tmp_path, "fp-a")
    with pytest.raises(FingerprintMismatch, match="another job"):
        run_compress(_job(tiny_llama_dir, 1), tiny_llama_dir, calib, tmp_path, "fp-b")


def test_cus_prun_dimensions_reach_the_actors(tiny_llama_dir, tmp_path, ray_local):
    """Per-dimension row subsets are cut with the data shards: 1 and 2 actors write the same bytes."""
    path = tmp_path / "calibration.parquet"
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    sources = ["general", "biomed"] * 3 + ["qa", "qa"]
    pq.write_table(pa.table({"input_ids": pa.array(ids.tolist(), pa.list_(pa.int32())), "source": sources}), path)
    dims = {"language": ["general"], "domain": ["biomed"], "task": ["qa"]}
    outs = []
    for k in (1, 2):
        job = JobConfig.model_validate({
            "model": str(tiny_llama_dir), "evaluate": {"tasks": []},
            "select": {"sources": {s: {"path": "unused"} for s in ("general", "biomed", "qa")}},
            "compress": {"algorithm": "cus_prun", "sparsity": 0.5, "cus_prun": {"dimensions": dims}},
            "ray": {"compress_actors": k, "cpus_per_actor": 0.5, "torch_threads": 1}})
        result = run_compress(job, tiny_llama_dir, path, tmp_path / f"k{k}", "fp")
        outs.append(_shards(tmp_path / f"k{k}"))
    assert outs[0] == outs[1]
    assert [m["neurons_kept"] for m in result["modules"]] == [64, 64]
    assert json.loads((tmp_path / "k2" / "model" / "config.json").read_text())["intermediate_size"] == 64


def test_collective_gloo_reduce_matches_object_store(tiny_llama_dir, calib, tmp_path, ray_local):
    """Statistics reduced with a ray.util.collective gloo group (what NCCL does between GPU actors)
    give the same checkpoint as the object-store tree; the transport is recorded."""
    outs = {}
    for transport in ("object_store", "gloo"):
        job = _job(tiny_llama_dir, 2, hessian_dtype="float64")
        job = job.model_copy(update={"ray": job.ray.model_copy(update={"collective": transport})})
        result = run_compress(job, tiny_llama_dir, calib, tmp_path / transport, "fp")
        assert result["statistics_transport"] == transport
        assert result["bytes_moved_per_layer"] == result["analytic_bytes_per_layer"]
        outs[transport] = _shards(tmp_path / transport)
    assert outs["gloo"] == outs["object_store"]
