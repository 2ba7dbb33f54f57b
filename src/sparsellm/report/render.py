"""`sparsellm report`: Markdown + a self-contained HTML page (tables, inline PNG plots).

Every number on the page sits next to where it came from: each run's provenance
(model and its hash, recipe, calibration/evaluation files with hashes, seeds, versions)
is listed, and the full Result is one click away in the HTML. Runs of every kind (prune,
shrink, activate, recover, eval, sweep points) share one summary table.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from sparsellm.export.hf import write_text_atomic
from sparsellm.report.markdown import fmt, table, tasks_section
from sparsellm.report.plots import knees, layer_sparsity_png, pareto_png, quality_png
from sparsellm.report.runs import Run, summary

SUMMARY_COLUMNS = [
    ("run", "run"),
    ("kind", "kind"),
    ("method", "method"),
    ("pattern", "pattern"),
    ("sparsity", "sparsity"),
    ("dense_ppl", "dense ppl"),
    ("sparse_ppl", "sparse ppl"),
    ("ppl_change", "Δ ppl"),
    ("kl", "KL"),
    ("top1", "top-1 agree"),
    ("task_avg_dense", "dense task avg"),
    ("task_avg", "task avg"),
    ("decode_speedup", "decode speedup"),
    ("seconds", "seconds"),
]
SUMMARY_NOTE = (
    "dense ppl is the dense reference (the teacher for recover); sparse ppl, KL and top-1 "
    "are of the changed model. sparsity: zero weights in pruned layers; for shrink the "
    "share of block parameters removed, for activate the share of weight reads skipped."
)
MAX_LAYER_PLOTS = 6


def _cell(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key == "ppl_change":
        return f"{value * 100:+.1f}%"
    if key == "decode_speedup":
        return f"{value:.3f}x"
    return value


def summary_rows(runs: list[Run]) -> list[list[Any]]:
    rows = [summary(r) for r in runs]
    return [[_cell(k, row[k]) for k, _ in SUMMARY_COLUMNS] for row in rows]


def provenance(run: Run) -> list[list[Any]]:
    """The Result fields a reader needs to reproduce the run's numbers."""
    r = run.result
    p = r.provenance
    model = p.get("model") or {}
    rows: list[list[Any]] = [
        ["kind", r.kind],
        ["model", model.get("source")],
        ["model hash", model.get("gguf_sha256") or model.get("sha256") or model.get("path")],
        ["recipe", json.dumps(r.recipe)],
    ]
    for part in ("calib", "eval", "data"):
        info = p.get(part) or {}
        if not info:
            continue
        data = info.get("data") or {}
        count = info.get("nsamples", info.get("windows"))
        rows.append([f"{part} data", f"{data.get('name')} sha256 {data.get('sha256')}"])
        rows.append([f"{part} windows", f"{count} × {info.get('seqlen')}"])
    rows.append(["seed", p.get("seed")])
    rows += [[k, v] for k, v in (p.get("versions") or {}).items()]
    return rows


def _layer_runs(runs: list[Run]) -> list[Run]:
    """Per-layer charts for the sparsest run of each method × pattern family (capped);
    only runs that pruned weights have per-layer sparsity."""
    best: dict[tuple[str, str], Run] = {}
    for run in (r for r in runs if r.layers):
        key = (run.method, run.family)
        if key not in best or run.sparsity > best[key].sparsity:
            best[key] = run
    return list(best.values())[:MAX_LAYER_PLOTS]


def _knee_rows(runs: list[Run]) -> list[list[Any]]:
    return [
        [method, family, "not found" if k is None else f"{k:.3f}"]
        for (method, family), k in knees(runs).items()
    ]


def plots(runs: list[Run]) -> dict[str, bytes]:
    """File name -> PNG for every plot of the report."""
    out = {"quality_vs_sparsity.png": quality_png(runs), "pareto.png": pareto_png(runs)}
    for run in _layer_runs(runs):
        out[f"layers_{run.name}.png"] = layer_sparsity_png(run)
    return out


def markdown(runs: list[Run], images: dict[str, bytes], title: str) -> str:
    parts = [
        f"# {title}",
        "## Summary\n"
        + table([h for _, h in SUMMARY_COLUMNS], summary_rows(runs))
        + f"\n\n{SUMMARY_NOTE}",
        "## Essential sparsity (knee of log-perplexity vs sparsity)\n"
        + table(["method", "pattern", "knee sparsity"], _knee_rows(runs)),
        "## Plots\n" + "\n".join(f"![{name}](plots/{name})" for name in images),
    ]
    for run in runs:
        section = [f"## Run {run.name}", *tasks_section(run.result)]
        section.append(table(["provenance", "value"], provenance(run)))
        parts.append("\n\n".join(section))
    return "\n\n".join(parts) + "\n"


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table_to_html(md: str) -> str:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    return _html_table(split(lines[0]), [split(ln) for ln in lines[2:]])


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
details pre{background:#f7f7f7;padding:1em;font-size:11px;overflow:auto;max-height:30em}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em}
"""


def html_page(runs: list[Run], images: dict[str, bytes], title: str) -> str:
    imgs = "".join(
        f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(n)}</figcaption></figure>'
        for n, png in images.items()
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Summary</h2>",
        _html_table([h for _, h in SUMMARY_COLUMNS], summary_rows(runs)),
        f"<p>{html.escape(SUMMARY_NOTE)}</p>",
        "<h2>Essential sparsity</h2><p>Knee of log(ppl / dense ppl) against sparsity "
        "(Kneedle): the last sparsity before quality drops fast.</p>",
        _html_table(["method", "pattern", "knee sparsity"], _knee_rows(runs)),
        "<h2>Plots</h2>" + imgs,
    ]
    for run in runs:
        body.append(f"<h2>Run {html.escape(run.name)}</h2>")
        for md in tasks_section(run.result):
            body.append("<h3>Tasks</h3>" + _md_table_to_html(md))
        body.append(_html_table(["provenance", "value"], provenance(run)))
        manifest = json.dumps(run.result.to_dict(), indent=1, default=str)
        body.append(
            f"<details><summary>full manifest</summary><pre>{html.escape(manifest)}</pre></details>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(runs: list[Run], out: Path, title: str = "sparsellm report") -> dict[str, Path]:
    """Write report.md, report.html and plots/*.png under `out` (each file atomically)."""
    images = plots(runs)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, png in images.items():
        tmp = out / "plots" / f".{name}.tmp"
        tmp.write_bytes(png)
        tmp.replace(out / "plots" / name)
    write_text_atomic(out / "report.md", markdown(runs, images, title))
    write_text_atomic(out / "report.html", html_page(runs, images, title))
    return {"markdown": out / "report.md", "html": out / "report.html", "plots": out / "plots"}
