"""Render a prune run's result as a terminal table and a Markdown report."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table (also readable in a terminal)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def comparison_table(result: dict[str, Any]) -> str:
    """Dense vs sparse summary rows."""
    dense, sparse = result.get("dense_ppl"), result.get("sparse_ppl")
    rows = [
        [
            "perplexity (" + result["eval"]["data"]["name"] + ")",
            dense,
            sparse,
            f"{(sparse / dense - 1) * 100:+.2f}%" if dense and sparse else "n/a",
        ],
        ["sparsity (pruned layers)", 0.0, result["measured_sparsity"], ""],
        ["prune seconds", "", result["prune_seconds"], ""],
    ]
    return table(["metric", "dense", "sparse", "change"], rows)


def _windows(part: dict[str, Any], count_key: str) -> str:
    return f"{part['data']['name']}: first {part[count_key]} windows × {part['seqlen']} tokens"


def markdown_report(result: dict[str, Any]) -> str:
    """The report.md written next to the saved model."""
    steps = "\n".join(f"- `{s}`" for s in result["recipe"])
    layer_rows = [
        [name, v["method"], v["target"], v["sparsity"]] for name, v in result["layers"].items()
    ]
    protocol = [
        ["calibration", _windows(result["calib"], "nsamples")],
        ["evaluation", _windows(result["eval"], "windows")],
        ["calibration dtype", result["calib"]["dtype"]],
        ["seed", result["seed"]],
        *[[k, v] for k, v in result["versions"].items()],
    ]
    sections = [
        f"# sparsellm report: {result['model']['source']}",
        comparison_table(result),
        "## Recipe\n" + steps,
        "## Protocol\n" + table(["what", "value"], protocol),
        "## Per-layer sparsity\n" + table(["layer", "method", "target", "measured"], layer_rows),
    ]
    return "\n\n".join(sections) + "\n"
