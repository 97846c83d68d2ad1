"""distributed.select on hostile input: a glob of mixed formats with bad files completes, each bad
file named with its reason and error in the manifest; a read worker killed mid-file changes nothing."""
import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import random_doc
from raycompress.chaos import MARKER as CHAOS_MARKER
from raycompress.config import load_config
from raycompress.data.records import CHAOS_KILL_READ_FILE
from raycompress.distributed.select import run_select


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    data = root / "data"
    data.mkdir()
    rng = random.Random(2)
    docs = [json.dumps({"id": f"a{i}", "text": random_doc(rng, 40)}) for i in range(20)]
    # 20 documents, a blank line, a line with a NUL byte: 22 lines, 3 shards of 8
    (data / "a.jsonl").write_bytes("\n".join(docs[:10] + [""] + docs[10:]).encode() + b'\n{"text": "x\x00"}\n')
    (data / "b.txt").write_text(random_doc(rng, 40))
    pq.write_table(pa.table({"text": [random_doc(rng, 40) for _ in range(6)]}), data / "c.parquet")
    (data / "d.jsonl.gz").write_bytes(gzip.compress("\n".join(docs).encode())[:50])  # cut short
    (data / "e.parquet").write_bytes(bytes(rng.randrange(256) for _ in range(300)))  # not Parquet
    pq.write_table(pa.table({"text": [1, 2]}), data / "f.parquet")  # text column of ints
    raw = {"model": "unused", "select": {"method": "random", "n_samples": 4, "seq_len": 32, "shard_docs": 8,
                                         "sources": {"mixed": {"path": str(data / "*")}}},
           "compress": {}, "evaluate": {"tasks": []}, "ray": {"select_actors": 1, "cpus_per_actor": 0.5}}
    (root / "job.yaml").write_text(yaml.safe_dump(raw))
    return load_config(root / "job.yaml")


def test_bad_files_counted_and_a_killed_read_changes_nothing(tmp_path, mixed, tiny_lm_dir, ray_local, monkeypatch):
    m = run_select(mixed, tiny_lm_dir, tmp_path / "calm")
    assert m["skipped"]["mixed"] == {"a.jsonl": {"blank_line": 1, "malformed_json": 1},
                                     "d.jsonl.gz": {"unreadable_file": 1}, "e.parquet": {"unreadable_file": 1},
                                     "f.parquet": {"not_text": 2}}
    errors = m["file_errors"]["mixed"]
    assert sorted(errors) == ["d.jsonl.gz", "e.parquet"]
    assert "Truncated compressed stream" in errors["d.jsonl.gz"] and "ArrowInvalid" in errors["e.parquet"]
    assert m["usable_documents"] == {"mixed": 20 + 1 + 6}  # every format of the glob read as its own
    assert len(m["selected"]) == 4

    marker = tmp_path / "killed"
    monkeypatch.setenv(CHAOS_KILL_READ_FILE, "a.jsonl")  # its read task dies after its first shard
    monkeypatch.setenv(CHAOS_MARKER, str(marker))
    k = run_select(mixed, tiny_lm_dir, tmp_path / "killed_run")
    assert marker.exists()  # the worker did die
    assert (k["fingerprint"], k["calibration_sha256"], k["skipped"]) == (m["fingerprint"], m["calibration_sha256"],
                                                                         m["skipped"])
    calibration = [(tmp_path / run / "calibration.parquet").read_bytes() for run in ("calm", "killed_run")]
    assert calibration[0] == calibration[1]
