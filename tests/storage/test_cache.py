"""Node cache: remote files fetched once per node, keyed by content, local files never copied."""
from __future__ import annotations

import hashlib

import pytest

from raycompress.storage import uri
from raycompress.storage.cache import NodeCache


def test_local_locations_are_used_in_place(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    cache = NodeCache(tmp_path / "cache")
    assert cache.file(str(tmp_path / "f.txt")) == tmp_path / "f.txt"
    assert cache.folder(f"file://{tmp_path}") == tmp_path
    assert not (tmp_path / "cache").exists()


def test_remote_file_cached_once_by_content(s3_server, tmp_path):
    base = s3_server(tmp_path.name)
    uri.write_text(uri.join(base, "m", "a.json"), "same")
    uri.write_text(uri.join(base, "n", "b.json"), "same")
    cache = NodeCache(tmp_path / "cache")
    first = cache.file(uri.join(base, "m", "a.json"))
    assert first.name == hashlib.sha256(b"same").hexdigest() and first.read_text() == "same"
    first.chmod(0o444)
    mtime = first.stat().st_mtime_ns
    assert cache.file(uri.join(base, "m", "a.json")) == first and first.stat().st_mtime_ns == mtime  # a hit
    assert cache.file(uri.join(base, "n", "b.json")) == first  # same content, one blob
    assert len(list((tmp_path / "cache" / "blobs").iterdir())) == 1


def test_changed_object_is_fetched_again(s3_server, tmp_path):
    loc = s3_server(f"{tmp_path.name}/c.json")
    uri.write_text(loc, "v1")
    cache = NodeCache(tmp_path / "cache")
    assert cache.file(loc).read_text() == "v1"
    uri.write_text(loc, "v2-longer")
    assert cache.file(loc).read_text() == "v2-longer"


def test_folder_view(s3_server, tmp_path):
    base = s3_server(f"{tmp_path.name}/model")
    for n in ("config.json", "w.safetensors"):
        uri.write_text(uri.join(base, n), n)
    cache = NodeCache(tmp_path / "cache")
    view = cache.folder(base, ["config.json"])
    assert sorted(p.name for p in view.iterdir()) == ["config.json"]
    assert cache.folder(base) == view
    assert (view / "w.safetensors").read_text() == "w.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        cache.folder(base, ["missing.json"])


def test_default_root_from_node_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYCOMPRESS_CACHE_DIR", str(tmp_path / "node"))
    assert NodeCache().root == tmp_path / "node"
    monkeypatch.delenv("RAYCOMPRESS_CACHE_DIR")
    assert str(NodeCache().root) == "/tmp/raycompress/cache"


def test_digest_is_every_byte_and_reused_while_the_stamp_holds(tmp_path, monkeypatch):
    import os

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100_000)
    cache = NodeCache(tmp_path / "cache")
    assert cache.digest(str(f)) == hashlib.sha256(b"a" * 100_000).hexdigest()
    st = f.stat()
    real = uri.sha256
    monkeypatch.setattr(uri, "sha256", lambda *a, **k: pytest.fail("re-read an unchanged file"))
    assert cache.digest(str(f)) == hashlib.sha256(b"a" * 100_000).hexdigest()  # stat only
    monkeypatch.setattr(uri, "sha256", real)
    f.write_bytes(b"a" * 50_000 + b"b" + b"a" * 49_999)  # one byte in the middle, same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))      # and the mtime put back: ctime still moves
    assert cache.digest(str(f)) == hashlib.sha256(b"a" * 50_000 + b"b" + b"a" * 49_999).hexdigest()


def test_digest_of_a_downloaded_object_needs_no_second_read(s3_server, tmp_path, monkeypatch):
    loc = uri.join(s3_server(tmp_path.name), "w.bin")
    uri.write_bytes(loc, b"weights")
    cache = NodeCache(tmp_path / "cache")
    cache.file(loc)
    monkeypatch.setattr(uri, "sha256", lambda *a, **k: pytest.fail("re-read a cached object"))
    assert cache.digest(loc) == hashlib.sha256(b"weights").hexdigest()
