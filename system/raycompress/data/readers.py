"""Where a corpus source's files are, without Ray: `expand_paths` turns a source's path, glob or
URI into its files and their labels, `read_plan` says how Ray Data should open them. The Ray Data
datasource that streams them is `distributed.readers.CorpusDatasource`; what a file's bytes
become is `data.records.FileReader`.

The `path` of a record is the file's *label*: its path relative to the non-wildcard root of the
source's pattern (a single file: its name), never where it happens to be stored, so that record
ids, duplicate keys and fingerprints are the same on any node, clone or bucket. Sources may be
local paths, globs, or URIs pyarrow's filesystems open (s3://, gs://, hdfs://, file://, globs
included).
"""
from __future__ import annotations

from pathlib import Path

from raycompress.data.records import (  # noqa: F401  (re-exported: the readers' public names)
    FILE_ERRORS, CorpusPathError, chaos_env, infer_format, record_byte_limit,
)
from raycompress.storage import uri


def expand_paths(spec: str, base: str | Path) -> dict[str, str]:
    """The files a source names (a path, glob or URI; relative ones against `base`), sorted:
    location (in the spec's own form) -> label (its path below the pattern's non-wildcard
    folder; a plain file: its name). See `storage.uri.glob_relative`.

    Raises:
        CorpusPathError: nothing matches (the pattern is named, a URI without its query).
    """
    found = dict(uri.glob_relative(spec, base))
    if not found:
        shown = spec if uri.is_uri(spec) or Path(spec).expanduser().is_absolute() else uri.join(base, spec)
        raise CorpusPathError(f"no file matches {uri.display(shown)}")
    return found


def read_plan(paths: list[str]) -> tuple[object | None, list[str]]:
    """(filesystem for Ray Data, paths inside it): local files as they are (filesystem None),
    URIs resolved by `storage.uri` so that a URI's query options (endpoint, scheme) are kept."""
    if all(uri.is_local(p) for p in paths):
        return None, [str(uri.local_path(p)) for p in paths]
    fs = uri.resolve(paths[0])[0]
    return fs, [uri.resolve(p)[1] for p in paths]
