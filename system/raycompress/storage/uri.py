"""Files by URI: every place raycompress reads or writes a file goes through these verbs.

A location is a local path (absolute, or relative to the caller's folder) or a URI that
`pyarrow.fs.FileSystem.from_uri` opens: ``file://``, ``s3://``, ``gs://``, ``hdfs://``, with
pyarrow's query options (``s3://bucket/x?endpoint_override=host:9000&scheme=http``). Credentials
come from the environment as pyarrow reads them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN / AWS_ENDPOINT_URL for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS).

Writes are atomic: a local file is written to a temporary name, fsync'd and renamed; an object is
uploaded in one PUT (or a multipart upload), which a store makes visible only once complete, so
a reader sees the old object or the whole new one, never a part.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

_CHUNK = 8 << 20  # bytes per read while streaming
_OBJECT_STORES = ("s3", "gcs")


class StorageError(OSError):
    """A location that cannot be opened (unknown scheme, missing file, no permission); names it."""


class DiskFull(StorageError):
    """The disk filled while writing a file: names the file, the bytes it needed and the space that
    was free. Nothing was left at the file's name (the partial temporary file is removed)."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (file:// included), False for a plain path."""
    return "://" in str(location)


def is_local(location: str | os.PathLike) -> bool:
    """A plain path or a file:// URI: readable with the OS's file calls on this node."""
    s = str(location)
    return not is_uri(s) or s.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """The path of a local location (file:// stripped, ~ expanded, made absolute).

    Raises:
        StorageError: the location is a remote URI.
    """
    s = str(location)
    if not is_local(s):
        raise StorageError(f"{s} is not on this node's filesystem")
    path = Path(s.removeprefix("file://")).expanduser().absolute()
    sys.audit("raycompress.storage.local", str(path))  # for tests that check which node opens what
    return path


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base` / parts, keeping a URI's scheme and query (``s3://b/x?o=1`` + "y" -> ``s3://b/x/y?o=1``)."""
    s = str(base)
    if not is_uri(s):
        return str(Path(s).joinpath(*parts))
    head, _, query = s.partition("?")
    path = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return path + ("?" + query if query else "")


def name(location: str | os.PathLike) -> str:
    """The last path component (a URI's query ignored)."""
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def display(location: str | os.PathLike) -> str:
    """A location for messages and manifests: a URI without its query (which may hold keys)."""
    return str(location).partition("?")[0]


@lru_cache(maxsize=32)
def _filesystem(root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0]


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a location; one filesystem object per scheme+authority+query.

    Raises:
        StorageError: pyarrow does not know the scheme or cannot build the filesystem.
    """
    s = str(location)
    if is_local(s):
        return pafs.LocalFileSystem(), str(local_path(s))
    parts = urlsplit(s)
    try:
        fs = _filesystem(f"{parts.scheme}://{parts.netloc}/" + (f"?{parts.query}" if parts.query else ""))
        return fs, pafs.FileSystem.from_uri(s)[1]
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with its own wording
        raise StorageError(f"cannot open {display(s)}: {exc}") from exc


def info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return info(location).type != pafs.FileType.NotFound


def _remove(location: str | os.PathLike, kind: pafs.FileType) -> bool:
    fs, path = resolve(location)
    if fs.get_file_info(path).type != kind:
        return False
    (fs.delete_file if kind == pafs.FileType.File else fs.delete_dir)(path)
    return True


def delete(location: str | os.PathLike) -> bool:
    """Remove one file (not a folder); returns whether it was there."""
    return _remove(location, pafs.FileType.File)


def delete_dir(location: str | os.PathLike) -> bool:
    """Remove a folder and everything under it; returns whether it was there."""
    return _remove(location, pafs.FileType.Directory)


def is_file(location: str | os.PathLike) -> bool:
    return info(location).type == pafs.FileType.File


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file.

    Raises:
        FileNotFoundError: nothing there (the message names the location).
    """
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path, compression=None) as f:  # bytes as stored, never decompressed
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{display(location)}: no such file") from exc


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | os.PathLike, data: bytes | memoryview) -> int:
    """Write `data` atomically (see the module docstring); parents are created. Returns bytes written."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        return _write_local(Path(path), [data], len(data))
    _make_parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return len(data)


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    if fs.type_name not in _OBJECT_STORES:  # object stores have no folders to create
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


def _write_local(path: Path, chunks: Iterable[bytes | memoryview], size: int | None = None) -> int:
    """Write `chunks` (`size` bytes in all, when known) to `path` through a temporary file.

    Raises:
        DiskFull: the disk filled (ENOSPC, EDQUOT); the temporary file is removed.
    """
    import errno
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                n += f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(path.parent).free
        need = f"{size} bytes" if size is not None else f"more than {n} bytes"
        raise DiskFull(exc.errno, f"no space left on the device of {path} while writing it: it needs {need}, "
                       f"{free} bytes are free; free space (or choose another --output) and rerun the same "
                       "command: finished work is kept") from exc
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


def write_text(location: str | os.PathLike, text: str) -> int:
    return write_bytes(location, text.encode("utf-8"))


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copy one file, across filesystems if need be (streamed; atomic at `dst`). Returns bytes."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    with sfs.open_input_stream(spath, compression=None) as f:
        blocks = iter(lambda: f.read(_CHUNK), b"")
        if isinstance(dfs, pafs.LocalFileSystem):
            return _write_local(Path(dpath), blocks)
        _make_parent(dfs, dpath)
        n = 0
        with dfs.open_output_stream(dpath) as g:
            for block in blocks:
                n += g.write(block)
        return n


def listdir(location: str | os.PathLike, folders: bool = False) -> list[str]:
    """Names of the files (with `folders`, also the sub-folders) directly under a folder, sorted;
    [] when there is none."""
    fs, path = resolve(location)
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    kinds = (pafs.FileType.File, pafs.FileType.Directory) if folders else (pafs.FileType.File,)
    return sorted(i.base_name for i in fs.get_file_info(sel) if i.type in kinds)


def glob(pattern: str, base: str | os.PathLike = ".") -> list[str]:
    """Files matching `pattern` (``*``, ``**``, ``?``, ``[ab]``), relative patterns against `base`;
    sorted locations in the pattern's own form (a URI pattern gives URIs, with its query)."""
    return [loc for loc, _ in glob_relative(pattern, base)]


def glob_relative(pattern: str, base: str | os.PathLike = ".") -> list[tuple[str, str]]:
    """Like `glob`, as (location, path below the pattern's non-wildcard folder) pairs; a pattern
    without wildcards gives its file with the file's name."""
    loc = pattern if is_uri(pattern) or Path(pattern).expanduser().is_absolute() else join(base, pattern)
    head, _, query = str(loc).partition("?")
    wild = min((i for i, c in enumerate(head) if c in "*?["), default=None)
    if wild is None:
        return [(str(loc), name(loc))] if is_file(loc) else []
    root = head[: head.rfind("/", 0, wild) + 1]
    fs, rpath = resolve(root + ("?" + query if query else ""))
    found = fs.get_file_info(pafs.FileSelector(rpath, allow_not_found=True, recursive=True))
    rx = _glob_regex(head[len(root):])
    rels = (i.path[len(rpath.rstrip("/")) + 1:] for i in found if i.type == pafs.FileType.File)
    return sorted((join(root.rstrip("/") + ("?" + query if query else ""), r), r) for r in rels if rx.fullmatch(r))


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell-glob semantics: ``*``, ``?`` and ``[ab]`` stay within one path component, ``**/`` spans any."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            c = pattern[i]
            out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
            i += 1
    return re.compile("".join(out))


def sha256(location: str | os.PathLike, sink=None) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file's contents as stored (never decompressed), streamed in
    `_CHUNK` blocks; each block is also written to `sink` (a binary file object) when given.
    The project's one streaming hash: the node cache, corpus manifests and content fingerprints use it.

    Raises:
        FileNotFoundError / OSError: the file cannot be opened or read.
    """
    fs, path = resolve(location)
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(path, compression=None) as f:
        while block := f.read(_CHUNK):
            h.update(block)
            if sink is not None:
                sink.write(block)
            n += len(block)
    return h.hexdigest(), n
