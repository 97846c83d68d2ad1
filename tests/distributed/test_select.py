"""distributed.select under a local Ray: bad input counted by reason and file, duplicates dropped,
byte-identical output on 1 and 2 workers, clear errors, every method end to end."""
import json
import random

import pytest
import yaml

from conftest import random_doc
from raycompress.config import load_config
from raycompress.data.readers import CorpusPathError
from raycompress.distributed.select import SelectionError, run_select


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    rng = random.Random(1)
    good = [json.dumps({"id": f"d{i}", "text": random_doc(rng, 50)}) for i in range(30)]
    bad = ["{oops", json.dumps([1]), json.dumps({"id": "x"}), json.dumps({"id": "y", "text": 5}),
           json.dumps({"id": "z", "text": "  "}), json.dumps({"id": "l", "text": "w " * 600})]
    dup = [good[0], good[1]]  # exact duplicates of two documents (content and id)
    (root / "a.jsonl").write_bytes(("\n".join(good[:15] + bad) + "\n").encode() + b'{"id": "u", "text": "\xff\xfe"}\n')
    (root / "b.jsonl").write_text("\n".join(good[15:] + dup) + "\n")
    (root / "gen.jsonl").write_text("\n".join(json.dumps({"text": random_doc(rng, 50)}) for _ in range(20)) + "\n")
    return root


def _job(tmp_path, corpora, model, **select):
    raw = {"model": str(model), "select": {"method": "zipcal", "n_samples": 6, "seq_len": 32, "shard_docs": 8,
           "sources": {"bio": {"path": str(corpora / "[ab].jsonl"), "max_doc_chars": 1000},
                       "gen": {"path": str(corpora / "gen.jsonl")}}, "mix": {"bio": 0.5, "gen": 0.5}, **select},
           "compress": {}, "evaluate": {"tasks": []}, "ray": {"select_actors": 1, "cpus_per_actor": 0.5}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "job.yaml")


def test_bad_input_and_duplicates_counted(tmp_path, corpora, tiny_lm_dir, ray_local):
    m = run_select(_job(tmp_path, corpora, tiny_lm_dir), tiny_lm_dir, tmp_path / "out")
    skipped = m["skipped"]["bio"]
    assert skipped["a.jsonl"] == {"malformed_json": 1, "not_an_object": 1, "missing_field": 1,
                                                 "not_text": 1, "empty": 1, "too_long": 1, "not_utf8": 1}
    assert skipped["b.jsonl"] == {"duplicate": 2}  # files by label: their path below the pattern's folder
    assert m["usable_documents"] == {"bio": 30, "gen": 20}
    assert m["quotas"] == {"bio": 3, "gen": 3} and len(m["selected"]) == 6
    assert all(x["sha256"] and len(x["sha256"]) == 64 for x in m["inputs"])


def test_same_fingerprint_from_a_folder_and_a_bucket_on_1_and_2_workers(tmp_path, corpora, tiny_lm_dir, ray_local,
                                                                         s3_server):
    """Perplexity selection (top-k through the two-round merge that zipf's top-k and random's
    bottom-k share) on the corpora in a folder with 1 worker, and in a bucket, output there too,
    with 2 workers: identical calibration bytes, calibration_sha256 and fingerprint (neither the
    location nor the worker count enters them)."""
    from raycompress.storage import uri

    bucket = s3_server(f"select/{tmp_path.name}")
    for p in corpora.iterdir():
        uri.copy(str(p), uri.join(bucket, "corpora", p.name))
    runs = []
    for name, root, workers in (("orig", str(corpora), 1), ("bucket", uri.join(bucket, "corpora"), 2)):
        (tmp_path / name).mkdir()
        job = _job(tmp_path / name, corpora, tiny_lm_dir, method="perplexity")
        sources = {k: v.model_copy(update={"path": uri.join(root, uri.name(v.path))}) for k, v in job.select.sources.items()}
        job = job.model_copy(update={"select": job.select.model_copy(update={"sources": sources}),
                                     "ray": job.ray.model_copy(update={"select_actors": workers})})
        out = uri.join(bucket, "out") if name == "bucket" else str(tmp_path / name / "out")
        m = run_select(job, tiny_lm_dir, out)
        runs.append((m["fingerprint"], m["calibration_sha256"], uri.read_bytes(uri.join(out, "calibration.parquet")),
                     [x["uid"] for x in m["selected"]]))
        assert [x["path"] for x in m["inputs"]] == ["a.jsonl", "b.jsonl", "gen.jsonl"]
        assert all("endpoint_override" not in x["location"] for x in m["inputs"])
    assert runs[0] == runs[1]
    assert not any(str(corpora) in uid for uid in runs[0][3])


# zipcal: greedy coverage re-run on the shard winners (perplexity's 1-vs-2 check is the bucket test
# above). Each 1-vs-2 pair runs four Ray Data pipelines (about 80 s here).
def test_same_bytes_on_1_and_2_workers(tmp_path, corpora, tiny_lm_dir, ray_local):
    outs = []
    for k in (1, 2):
        (tmp_path / f"w{k}").mkdir()
        job = _job(tmp_path / f"w{k}", corpora, tiny_lm_dir, method="zipcal")
        job = job.model_copy(update={"ray": job.ray.model_copy(update={"select_actors": k})})
        m = run_select(job, tiny_lm_dir, tmp_path / f"w{k}" / "out")
        outs.append(((tmp_path / f"w{k}" / "out" / "calibration.parquet").read_bytes(), m["fingerprint"]))
    assert outs[0] == outs[1]


def test_errors_name_the_problem(tmp_path, corpora, tiny_lm_dir, ray_local):
    job = _job(tmp_path, corpora, tiny_lm_dir)
    with pytest.raises(CorpusPathError, match="nothing.jsonl"):
        srcs = {**job.select.sources, "bio": job.select.sources["bio"].model_copy(update={"path": str(tmp_path / "nothing.jsonl")})}
        run_select(job.model_copy(update={"select": job.select.model_copy(update={"sources": srcs})}), tiny_lm_dir, tmp_path / "e1")
    with pytest.raises(SelectionError, match="fewer than the 500 asked for"):
        run_select(job.model_copy(update={"select": job.select.model_copy(update={"n_samples": 1000})}), tiny_lm_dir, tmp_path / "e2")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    srcs = {**job.select.sources, "gen": job.select.sources["gen"].model_copy(update={"path": str(tmp_path / "bad.jsonl")})}
    with pytest.raises(SelectionError, match="no usable documents"):
        run_select(job.model_copy(update={"select": job.select.model_copy(update={"sources": srcs})}), tiny_lm_dir, tmp_path / "e3")


def test_multi_source_kcenter(tmp_path, corpora, tiny_lm_dir, ray_local):
    from transformers import AutoTokenizer, BertConfig, BertModel

    emb_dir = tmp_path / "embedder"
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(emb_dir)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(emb_dir)
    job = _job(tmp_path, corpora, tiny_lm_dir, multi_source="kcenter", embedder=str(emb_dir))
    m = run_select(job, tiny_lm_dir, tmp_path / "out")
    assert m["quotas"] == {"bio": 6, "gen": 6}  # each source selects n_samples ...
    assert len(m["selected"]) == 6  # ... and k-center cuts the union to n_samples
    assert len({s["uid"] for s in m["selected"]}) == 6


def test_routing_selection_end_to_end(tmp_path, corpora, tiny_lm_dir, ray_local):
    """method routing on a tiny Qwen3-MoE: the select actors probe the routers, the driver merges
    with the sources chosen so far as the prior, and the manifest records each source's coverage."""
    import shutil

    from transformers import AutoTokenizer

    from tests.models.moe_fixtures import make_tiny_moe

    model = tmp_path / "moe"
    make_tiny_moe(model, "Qwen3MoeForCausalLM", vocab=len(AutoTokenizer.from_pretrained(tiny_lm_dir)))
    for f in tiny_lm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model / f.name)
    job = _job(tmp_path, corpora, model, method="routing", routing={"min_tokens_per_expert": 4, "probe_layers": 2})
    m = run_select(job, model, tmp_path / "out")
    assert len(m["selected"]) == 6 and m["method"] == "routing"
    cov = m["routing_coverage"]
    assert set(cov) == {"bio", "gen"}
    for source in cov.values():
        assert source["experts_reached"] > 0 and source["min_tokens_per_expert"] == 4
        assert len(source["tokens"]) == 2 and len(source["tokens"][0]) == 8  # probed layers x experts
    again = run_select(job, model, tmp_path / "out2")
    assert again["calibration_sha256"] == m["calibration_sha256"]
