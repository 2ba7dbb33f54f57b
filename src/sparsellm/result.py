"""`Result`: the one record every command writes and the only thing `report` reads.

Whatever a command did (prune, shrink, activate, recover, eval, a sweep point), its
outcome has the same shape: the resolved recipe, quality before and after (the dense
parent's numbers beside the changed model's, measured in one run), the sparsity
achieved, where the time went, and enough provenance to reproduce every number. Kind-
specific detail (a structured method's ranks, an activation method's thresholds, speed
tables) goes under `details`, so the top level never changes shape per command.

`quality` is ``{"before": {...}, "after": {...}, "comparison": {...}}``: ``before`` and
``after`` hold the same metric keys (``ppl`` and, when tasks ran, ``tasks``);
``comparison`` holds metrics of the pair (``kl``, ``top1_agreement``). For `recover`,
``before`` is the model recovery started from and ``after`` the recovered model; for
`eval` only ``after`` is filled.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsellm.errors import SparseLLMError

SCHEMA_VERSION = 1
KINDS = ("prune", "run", "shrink", "activate", "recover", "eval", "sweep-point")
RESULT_FILE = "sparsellm_manifest.json"  # the manifest beside a saved model *is* its Result


@dataclass
class Result:
    """What a command did and measured; serialised as ``sparsellm_manifest.json``."""

    kind: str
    recipe: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    sparsity: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SparseLLMError(f"Result kind must be one of {KINDS}, got {self.kind!r}")

    # --- the numbers a comparison needs, whatever the kind --------------------------------
    def metric(self, side: str, key: str) -> Any:
        """``quality[side][key]`` (side: before / after / comparison), or None."""
        return (self.quality.get(side) or {}).get(key)

    @property
    def method(self) -> str:
        """The recipe's methods joined by ``+`` (``"dense"`` for a plain evaluation)."""
        steps = self.recipe.get("steps") or []
        attention = [v["method"] for v in (self.recipe.get("attention") or {}).values() if v]
        return "+".join([s["method"] for s in steps] + attention) or "dense"

    @property
    def measured_sparsity(self) -> float:
        return float(self.sparsity.get("measured") or 0.0)

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """Inverse of `to_dict`; refuses other schemas with a message saying what it is."""
        if not isinstance(data, dict) or "schema_version" not in data or "kind" not in data:
            raise SparseLLMError("not a sparsellm Result (no schema_version/kind)")
        if data["schema_version"] != SCHEMA_VERSION:
            raise SparseLLMError(
                f"Result schema {data['schema_version']} is not supported "
                f"(this sparsellm reads schema {SCHEMA_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, path: str | Path) -> Path:
        """Write atomically as JSON to `path` (a file, or a directory: its manifest)."""
        from sparsellm.export.hf import write_json_atomic

        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, path: str | Path) -> Result:
        """Read a Result file, or the manifest of a run directory."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SparseLLMError(f"{path} does not exist: not a sparsellm run") from None
        except json.JSONDecodeError as exc:
            raise SparseLLMError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except SparseLLMError as exc:
            raise SparseLLMError(f"{path}: {exc}") from None
