"""The whole job on a simulated multi-node cluster (`ray.cluster_utils.Cluster`) with no shared
filesystem: model, corpora, task data and output in an S3-compatible bucket (moto on 127.0.0.1),
each node with its own scratch folder as its cache. Checks: the checkpoint in the bucket has the
same SHA-256 manifest as a single-node run on local disk; no process on one node resolved or
opened a path under another node's scratch folder; a worker node removed mid-compress costs a
restart, not the job, and the checkpoint is the same.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time

import pytest
import yaml

from conftest import random_doc

pytestmark = pytest.mark.integration
NODES = ("head", "node-a", "node-b")


def _audit_opens() -> None:
    """Worker setup hook: append every path this process opens (Python `open`) or resolves to a
    local file (raycompress's own audit event) under the test's scratch root to
    <its node's scratch>/opened-<pid>.log."""
    import os
    import sys

    node, root = os.environ.get("RAYCOMPRESS_CACHE_DIR"), os.environ.get("RC_TEST_SCRATCH_ROOT")
    if not node or not root:
        return
    fd = os.open(os.path.join(os.path.dirname(node), f"opened-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def hook(event, args):
        if event in ("open", "raycompress.storage.local") and args and isinstance(args[0], str) \
                and args[0].startswith(root):
            os.write(fd, (args[0] + "\n").encode())

    sys.addaudithook(hook)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_lm_dir, s3_server):
    """The job's inputs, once in a local folder and once in the bucket."""
    from raycompress.storage import uri

    local = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    files = {
        "bio.jsonl": "\n".join(json.dumps({"id": f"b{i}", "text": random_doc(rng, 60)}) for i in range(30)) + "\n",
        "gen.jsonl": "\n".join(json.dumps({"id": f"g{i}", "text": random_doc(rng, 60)}) for i in range(30)) + "\n",
        "eval.jsonl": "\n".join(json.dumps({"text": random_doc(rng, 80)}) for _ in range(4)) + "\n",
    }
    for name, text in files.items():
        (local / name).write_text(text)
        uri.write_text(s3_server(f"inputs/{name}"), text)
    shutil.copytree(tiny_lm_dir, local / "model")
    for p in tiny_lm_dir.iterdir():
        uri.copy(str(p), s3_server(f"inputs/model/{p.name}"))
    return {"local": str(local), "remote": s3_server("inputs")}


def _job(base: str, tmp_path, **ray) -> object:
    from raycompress.config import load_config
    from raycompress.storage import uri

    raw = {"name": "multinode", "model": uri.join(base, "model"),
           "select": {"method": "zipcal", "n_samples": 8, "seq_len": 32, "seed": 0,
                      "sources": {"bio": {"path": uri.join(base, "bio.jsonl")}, "gen": {"path": uri.join(base, "gen.jsonl")}},
                      "mix": {"bio": 0.75, "gen": 0.25}},
           "compress": {"algorithm": "sparsegpt", "sparsity": 0.5},
           "evaluate": {"batch_tokens": 512, "include_dense": False, "tasks": [
               {"name": "ppl", "kind": "perplexity", "path": uri.join(base, "eval.jsonl"), "max_length": 32}]},
           "ray": {"compress_actors": 2, "eval_actors": 2, "select_actors": 1, "torch_threads": 1, **ray}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "job.yaml")


def _run(job, out: str) -> dict:
    from raycompress.distributed.orchestrator import ORDER, run_job
    from raycompress.models.fetch import resolve_model
    from raycompress.storage import uri

    run_job(job, out, ORDER, resolve_model(job.model, job.base_dir, job.storage.cache_dir))
    return json.loads(uri.read_text(uri.join(out, "compress", "model", "manifest.sha256.json")))


@pytest.fixture(scope="module")
def single_node(inputs, tmp_path_factory):
    """Reference: the same job on one local Ray node, every file on local disk."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    tmp = tmp_path_factory.mktemp("single")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifest = _run(_job(inputs["local"], tmp, cpus_per_actor=0.5), str(tmp / "out"))
    finally:
        ray.shutdown()
    yield manifest
    if was_up:  # give the session's other tests their local Ray back
        ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)


@pytest.fixture
def cluster(tmp_path, monkeypatch, single_node):
    """Head (no CPUs: the driver only) and two worker nodes with 2 CPUs each, each node with its
    own scratch folder as its cache (RAYCOMPRESS_CACHE_DIR in that node's raylet environment)."""
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    root = tmp_path / "scratch"
    env = lambda n: {"RAYCOMPRESS_CACHE_DIR": str(root / n / "cache"), "RC_TEST_SCRATCH_ROOT": str(root)}  # noqa: E731
    monkeypatch.setenv("RAYCOMPRESS_CACHE_DIR", str(root / "head" / "cache"))  # the driver is on the head
    for n in NODES:
        (root / n).mkdir(parents=True)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "env_vars": env("head"),
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    nodes = [c.add_node(num_cpus=2, resources={n: 1}, env_vars=env(n)) for n in NODES[1:]]
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=c.address, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _audit_opens,
                          "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        yield c, nodes, root
    finally:
        ray.shutdown()
        c.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _opened(root) -> dict[str, set[str]]:
    """node -> paths its processes opened under the scratch root."""
    out = {}
    for n in NODES:
        paths = set()
        for log in (root / n).glob("opened-*.log"):
            paths |= set(log.read_text().split())
        out[n] = paths
    return out


def test_job_on_three_nodes_matches_single_node(inputs, cluster, single_node, s3_server, tmp_path):
    _, _, root = cluster
    out = s3_server(f"runs/{tmp_path.name}")
    manifest = _run(_job(inputs["remote"], tmp_path, cpus_per_actor=2), out)  # 2 CPUs: one actor per node
    assert manifest == single_node
    opened = _opened(root)
    for n in NODES[1:]:
        assert any("/blobs/" in p for p in opened[n]), f"{n} did no work from its own cache"
    for n, paths in opened.items():
        foreign = sorted(p for p in paths if not p.startswith(str(root / n) + os.sep))
        assert not foreign, f"{n} opened other nodes' files: {foreign[:5]}"
    from raycompress.storage import uri

    results = json.loads(uri.read_text(uri.join(out, "evaluate", "results.json")))
    assert results["compressed"]["tasks"]["ppl"]["n"] == 4
    assert "ppl" in uri.read_text(uri.join(out, "report.md"))


def test_node_lost_mid_compress(inputs, cluster, single_node, s3_server, tmp_path, monkeypatch):
    from ray._private.state import actors  # the GCS's actor table (the state API needs the dashboard)

    from raycompress.engine import pipeline
    from raycompress.storage import uri

    c, nodes, _ = cluster
    mark = pipeline.Progress.mark
    removed = []

    def mark_then_lose_a_node(self, idx, records, layer):
        mark(self, idx, records, layer)
        if idx == 0 and not removed:  # layer 0 is in the bucket: take away a node holding an actor
            alive = {a["Address"]["NodeID"] for a in actors().values()
                     if a["ActorClassName"] == "_Shell" and a["State"] == "ALIVE"}
            victim = next(n for n in nodes if n.node_id in alive)
            c.remove_node(victim, allow_graceful=False)
            removed.append(victim.node_id)
            deadline = time.monotonic() + 60  # until the GCS has seen the node's actors die
            while time.monotonic() < deadline and any(
                    a["Address"]["NodeID"] == victim.node_id and a["State"] == "ALIVE" for a in actors().values()):
                time.sleep(0.2)

    monkeypatch.setattr(pipeline.Progress, "mark", mark_then_lose_a_node)
    out = s3_server(f"runs/{tmp_path.name}")
    manifest = _run(_job(inputs["remote"], tmp_path, cpus_per_actor=1), out)
    assert removed  # (the GCS may still list the node as alive: its health checks take ~30 s to fail it)
    comp = json.loads(uri.read_text(uri.join(out, "compress", "compression.json")))
    assert comp["restarts"] >= 1
    assert manifest == single_node
