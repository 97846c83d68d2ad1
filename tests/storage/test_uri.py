"""Storage verbs on a local folder and on an S3-compatible server: same behaviour either way."""
from __future__ import annotations

import hashlib

import pytest

from raycompress.storage import uri


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_server")(tmp_path.name)


def test_write_read_list_copy(root):
    a = uri.join(root, "a", "x.json")
    assert not uri.exists(a)
    assert uri.write_text(a, "{}") == 2
    assert uri.read_text(a) == "{}" and uri.is_file(a)
    uri.write_bytes(uri.join(root, "a", "y.bin"), b"\x00" * 10)
    assert uri.listdir(uri.join(root, "a")) == ["x.json", "y.bin"]
    assert uri.listdir(uri.join(root, "missing")) == []
    assert uri.copy(a, uri.join(root, "b", "x.json")) == 2
    assert uri.sha256(uri.join(root, "b", "x.json")) == (hashlib.sha256(b"{}").hexdigest(), 2)


def test_overwrite_is_whole(root):
    a = uri.join(root, "state.json")
    uri.write_text(a, "old" * 1000)
    uri.write_text(a, "new")
    assert uri.read_text(a) == "new"
    assert uri.listdir(root) == ["state.json"]  # no temporary left behind


def test_glob_component_semantics(root):
    for rel in ("d/a.jsonl", "d/b.jsonl", "d/sub/c.jsonl", "d/n.txt"):
        uri.write_text(uri.join(root, rel), "x")
    names = lambda ps: [uri.name(p) for p in ps]  # noqa: E731
    assert names(uri.glob(uri.join(root, "d/*.jsonl"))) == ["a.jsonl", "b.jsonl"]
    assert names(uri.glob(uri.join(root, "d/**/*.jsonl"))) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert uri.glob(uri.join(root, "d/none*.jsonl")) == []
    assert names(uri.glob(uri.join(root, "d/[ab].jsonl"))) == ["a.jsonl", "b.jsonl"]
    assert names(uri.glob(uri.join(root, "d/[!a].jsonl"))) == ["b.jsonl"]
    assert names(uri.glob(uri.join(root, "d/n.txt"))) == ["n.txt"]


def test_relative_glob_against_base(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.jsonl").write_text("x")
    assert uri.glob("c/*.jsonl", base=tmp_path) == [str(tmp_path / "c" / "one.jsonl")]


def test_missing_file_named(root):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        uri.read_bytes(uri.join(root, "nope.json"))


def test_join_keeps_query_and_display_drops_it():
    assert uri.join("s3://b/x?endpoint_override=h:1", "y") == "s3://b/x/y?endpoint_override=h:1"
    assert uri.display("s3://b/x/y?secret_key=k") == "s3://b/x/y"
    assert uri.name("s3://b/x/y.json?o=1") == "y.json"
    assert uri.is_local("file:///tmp/x") and uri.is_local("rel/x") and not uri.is_local("gs://b/x")


def test_unknown_scheme_is_named():
    with pytest.raises(uri.StorageError, match="nosuch://b/x"):
        uri.read_bytes("nosuch://b/x")


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC while writing (stubbed at fsync, where a real disk reports it last): DiskFull names the
    file and the bytes it needed; neither the file nor its temporary remains."""
    import errno

    from raycompress.storage import uri

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uri.os, "fsync", full)
    target = tmp_path / "model" / "model-00001-of-00003.safetensors"
    with pytest.raises(uri.DiskFull, match=r"model-00001-of-00003\.safetensors while writing it: it needs 1000 bytes"):
        uri.write_bytes(target, b"x" * 1000)
    assert list((tmp_path / "model").iterdir()) == []


def test_compressed_files_are_bytes_as_stored(tmp_path):
    """read_bytes, copy and sha256 see a .gz file's own bytes (pyarrow would decompress by extension)."""
    import gzip

    from raycompress.storage import uri

    raw = gzip.compress(b'{"text": "a"}\n' * 100)
    src = tmp_path / "c.jsonl.gz"
    src.write_bytes(raw)
    assert uri.read_bytes(src) == raw
    uri.copy(src, tmp_path / "copy.jsonl.gz")
    assert (tmp_path / "copy.jsonl.gz").read_bytes() == raw
    assert uri.sha256(src) == (hashlib.sha256(raw).hexdigest(), len(raw))
