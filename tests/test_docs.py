"""The user-facing docs stay true: the README's size limit and every relative link."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8")) <= 10_000


def test_relative_links_resolve():
    broken = []
    for page in _pages():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # web links and same-page anchors
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_pointer_outside_the_repo():
    """Docs and sources never send the reader to files the repository does not hold."""
    offenders = []
    for path in [*_pages(), *sorted((ROOT / "src").rglob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        for name in ("DATA.md", "DESIGN.md", "../shared"):
            if re.search(rf"(?<![\w/]){re.escape(name)}", text):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders
