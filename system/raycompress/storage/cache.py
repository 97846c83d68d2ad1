"""A node-local cache of remote files, filled once per node and keyed by content SHA-256.

Layout under the cache root (`storage.cache_dir` in the job, else $RAYCOMPRESS_CACHE_DIR on the
node, else /tmp/raycompress/cache; never a home folder, which on a cluster is the head's):

    blobs/<sha256>             one copy of each distinct file content
    refs/<key>.json            location -> {sha256, size, mtime_ns}: a later request for the same
                               unchanged object (same size and modification time) is a hit
    views/<key>/<name>         symlinks to blobs, so that a remote folder looks like a local one
                               (what transformers' from_pretrained and safetensors' mmap need)
    digests/<key>.json         location -> {sha256, stamp}: content digests of local or remote
                               files (`NodeCache.digest`), recomputed only when the stamp changes

Local locations are never copied: they are read where they are. Downloads are streamed, hashed on
the way, and renamed into place, under a per-object file lock, so that several actors on a node
download an object once and a reader never sees a partial file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from raycompress.storage import uri

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/tmp/raycompress/cache"


def default_root() -> Path:
    """$RAYCOMPRESS_CACHE_DIR on this node, else /tmp/raycompress/cache."""
    return Path(os.environ.get("RAYCOMPRESS_CACHE_DIR") or DEFAULT_ROOT)


def _stamp(location: str) -> dict:
    """What the storage guarantees changes when a file's content does (see `NodeCache.digest`).

    Raises:
        FileNotFoundError: nothing at `location`.
    """
    if uri.is_local(location):
        st = os.stat(uri.local_path(location))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    meta = uri.info(location)
    if meta.type == uri.pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri.display(location)}: no such file")
    return {"size": meta.size, "mtime_ns": meta.mtime_ns}


def _key(location: str) -> str:
    return hashlib.sha256(str(location).encode()).hexdigest()[:32]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class NodeCache:
    """Local files for locations (see the module docstring).

    Args:
        root: the cache folder on this node; None: `default_root()`.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_root()

    def file(self, location: str) -> Path:
        """A local path holding the file at `location` (downloaded once per node if remote).

        Raises:
            FileNotFoundError: nothing at `location`.
        """
        if uri.is_local(location):
            return uri.local_path(location)
        stamp = _stamp(location)
        ref = self.root / "refs" / f"{_key(location)}.json"
        with _locked(ref.with_suffix(".lock")):
            if ref.is_file():
                known = json.loads(ref.read_text())
                blob = self.root / "blobs" / known["sha256"]
                if {k: known.get(k) for k in stamp} == stamp and blob.is_file():
                    sys.audit("raycompress.storage.local", str(blob))
                    return blob
            digest = self._download(location)
            ref.write_text(json.dumps({"location": uri.display(location), "sha256": digest, **stamp}))
        sys.audit("raycompress.storage.local", str(self.root / "blobs" / digest))
        return self.root / "blobs" / digest

    def _download(self, location: str) -> str:
        blobs = self.root / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        tmp = blobs / f".{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as dst:
                digest, n = uri.sha256(location, sink=dst)
            os.replace(tmp, blobs / digest)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("cached %s (%.1f MB) as %s", uri.display(location), n / 1e6, digest[:12])
        return digest

    def digest(self, location: str) -> str:
        """The SHA-256 of every byte of the file at `location`, computed once and reused while the
        storage's own stamp of the file is unchanged: size, mtime, ctime and inode for a local file
        (ctime cannot be set back by a user, so an edit that restores the mtime is still seen);
        size and modification time (the object's Last-Modified, new on every write) on object
        storage, where a file this cache downloaded is a hit without reading it again.
        Records live in `digests/<key>.json` under the cache root.

        Raises:
            FileNotFoundError: nothing at `location`.
        """
        stamp = _stamp(location)
        rec = self.root / "digests" / f"{_key(uri.display(location))}.json"
        with _locked(rec.with_suffix(".lock")):
            if rec.is_file():
                known = json.loads(rec.read_text())
                if known.get("stamp") == stamp:
                    return known["sha256"]
            ref = self.root / "refs" / f"{_key(location)}.json"
            known = json.loads(ref.read_text()) if not uri.is_local(location) and ref.is_file() else {}
            if known and {k: known.get(k) for k in stamp} == stamp:
                digest = known["sha256"]
            else:
                digest = uri.sha256(location)[0]
            rec.write_text(json.dumps({"location": uri.display(location), "sha256": digest, "stamp": stamp}))
        return digest

    def folder(self, location: str, names: Iterable[str] | None = None) -> Path:
        """A local folder that shows the files `names` (default: every file directly under
        `location`) of the folder at `location`; a local folder is returned as it is.
        Call again with more names to add files to the same view.

        Raises:
            FileNotFoundError: a named file is missing.
        """
        if uri.is_local(location):
            return uri.local_path(location)
        view = self.root / "views" / _key(location)
        view.mkdir(parents=True, exist_ok=True)
        for name in (uri.listdir(location) if names is None else names):
            blob = self.file(uri.join(location, name))
            link = view / name
            if link.is_symlink() and Path(os.readlink(link)) == blob:
                continue
            tmp = view / f".{name}.{uuid.uuid4().hex[:8]}"
            tmp.symlink_to(blob)
            os.replace(tmp, link)
        sys.audit("raycompress.storage.local", str(view))
        return view
