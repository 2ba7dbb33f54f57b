"""Argument builders shared by the CLI tests (tiny on-disk model, tiny corpus)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def cli_args(
    command: str,
    tiny_dir: Path,
    text_file: Path,
    *extra: str,
    out: Path | None = None,
    eval_windows: int = 4,
) -> list[str]:
    """`command` on the tiny model, calibrated and evaluated on the tiny corpus."""
    args = [command, "--model", str(tiny_dir), "--calib", str(text_file)]
    args += ["--eval", str(text_file), "--nsamples", "4", "--seqlen", "64"]
    args += ["--eval-windows", str(eval_windows)]
    if out is not None:
        args += ["--out", str(out)]
    return [*args, *extra]


def last_json(capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """The JSON result a `--json` command printed last."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
