"""House rules that keep the source readable: no oversized module without a stated reason."""

from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsellm"
LIMIT = 400


def test_no_module_over_limit_without_a_reason():
    """A module over ~400 lines must say why at its top (a line containing "Long module:")."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > LIMIT and not any("Long module:" in line for line in lines[:30]):
            offenders.append(f"{path.relative_to(SRC)} ({len(lines)} lines)")
    assert not offenders, "modules over 400 lines without a reason at the top: " + ", ".join(
        offenders
    )
