"""Where compression actors compute: the device follows Ray's GPU assignment (logical GPUs on a
local Ray, and a two-node `ray.cluster_utils.Cluster`), and an actor whose assigned GPU is no CUDA
device it can see runs on the CPU, with the same bytes as a CPU-only run. Each Ray here runs in its
own subprocess, apart from the session's CPU-only Ray, with CUDA_VISIBLE_DEVICES=90,91: Ray takes
its GPU ids from there and no machine has such devices, so the test means the same on a host with
GPUs as on one without."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from raycompress.distributed.compress import choose_device


def test_choose_device_follows_assignment():
    assert choose_device([], "0,1", True) == "cpu"
    assert choose_device(["1"], "1", True) == "cuda:0"  # Ray narrows CUDA_VISIBLE_DEVICES to the assignment
    assert choose_device([3], "2,3", True) == "cuda:1"
    assert choose_device(["0"], "0", False) == "cpu"  # a logical GPU without CUDA: compute on the CPU


SCRIPT = textwrap.dedent("""
    import json, sys, torch, ray
    import pyarrow as pa, pyarrow.parquet as pq
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_llama
    from raycompress.config import JobConfig
    from raycompress.distributed.compress import CompressionActor, run_compress
    tmp = Path({tmp!r})
    make_tiny_llama(tmp / "m")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    pq.write_table(pa.table({{"input_ids": pa.array(ids.tolist(), pa.list_(pa.int32()))}}), tmp / "c.parquet")
    if {multinode}:
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "num_gpus": 1}})
        cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    actors = [CompressionActor.options(num_cpus=0.5, num_gpus=1).remote(str(tmp / "m"), ids[:4]) for _ in range(2)]
    placement = ray.get([a.placement.remote() for a in actors])
    cuda = ray.get([a.__ray_call__.remote(lambda self: torch.cuda.is_available()) for a in actors])
    nodes = ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for a in actors])
    for a in actors:
        ray.kill(a)
    out = {{}}
    for k, gpus in ((1, 0), (2, 1)):
        job = JobConfig.model_validate({{"model": str(tmp / "m"), "select": {{"sources": {{"x": {{"path": "u"}}}}}},
            "compress": {{"algorithm": "sparsegpt", "hessian_dtype": "float64"}}, "evaluate": {{"tasks": []}},
            "ray": {{"compress_actors": k, "cpus_per_actor": 0.5, "gpus_per_actor": gpus, "torch_threads": 1}}}})
        res = run_compress(job, tmp / "m", tmp / "c.parquet", tmp / f"k{{k}}", "fp")
        out[k] = {{"devices": res["devices"],
                   "bytes": [p.read_bytes().hex() for p in sorted((tmp / f"k{{k}}" / "model").glob("*.safetensors"))]}}
    print("RESULT " + json.dumps({{"placement": placement, "cuda": cuda, "nodes": nodes, "same_bytes": out[1]["bytes"] == out[2]["bytes"],
                                  "devices": out[2]["devices"]}}))
""")


GPU_IDS = ("90", "91")  # CUDA device ordinals no machine has


def _run(tmp_path, multinode: bool) -> dict:
    from pathlib import Path

    code = SCRIPT.format(tests=str(Path(__file__).parents[1]), tmp=str(tmp_path), multinode=multinode)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(GPU_IDS)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.integration
@pytest.mark.parametrize("multinode", [False, True], ids=["logical-gpus", "two-node-cluster"])
def test_actors_take_their_assigned_gpu(tmp_path, multinode):
    r = _run(tmp_path, multinode)
    if not multinode:  # two logical GPUs on one node: each actor holds a different one
        assert sorted(str(p["gpu_ids"][0]) for p in r["placement"]) == list(GPU_IDS)
    assert r["cuda"] == [False, False]  # an assigned id no device has: the actor sees no CUDA device
    for p, cuda in zip(r["placement"], r["cuda"]):
        assert len(p["gpu_ids"]) == 1
        assert p["cuda_visible_devices"] == str(p["gpu_ids"][0])  # Ray narrowed the visible devices
        assert p["device"] == choose_device(p["gpu_ids"], p["cuda_visible_devices"], cuda) == "cpu"
    if multinode:
        assert len(set(r["nodes"])) == 2  # one actor per node, each with its node's GPU
    # a 2-actor run holding GPUs no actor can use writes the same bytes as a CPU-only 1-actor run
    assert r["same_bytes"] and r["devices"] == ["cpu", "cpu"]
