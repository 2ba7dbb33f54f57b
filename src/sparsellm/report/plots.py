"""PNG plots for reports (matplotlib, headless Agg backend, no global state left behind).

Each function returns PNG bytes so the HTML can inline them and Markdown can link them.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

from sparsellm.report.knee import essential_sparsity
from sparsellm.report.runs import Run, summary


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global figure registry

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def layer_sparsity_png(run: Run) -> bytes:
    """Measured sparsity of every pruned layer, in model order, coloured by layer kind."""
    layers = run.layers
    names = list(layers)
    kinds = [n.rsplit(".", 1)[-1] for n in names]
    palette = {k: f"C{i}" for i, k in enumerate(dict.fromkeys(kinds))}
    fig = _figure(max(7.0, len(names) * 0.045), 3.6)
    ax = fig.add_subplot()
    ax.bar(
        range(len(names)),
        [layers[n]["sparsity"] for n in names],
        width=0.85,
        color=[palette[k] for k in kinds],
    )
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, label=kind) for kind, colour in palette.items()]
    handles.append(
        ax.axhline(
            run.sparsity, color="black", lw=0.8, ls="--", label=f"overall {run.sparsity:.3f}"
        )
    )
    ax.set(
        xlabel="pruned layer (model order)",
        ylabel="sparsity",
        ylim=(0, 1),
        title=f"per-layer sparsity: {run.name}",
    )
    ax.legend(handles=handles, fontsize=7, ncol=4, loc="upper right")
    return _png(fig)


def curves(runs: list[Run]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Summary rows grouped by (method, family), sorted by sparsity (runs without a
    perplexity of the changed model, e.g. a failed measurement, are left out)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        row = summary(run)
        if row["sparse_ppl"] is not None:
            groups[(run.method, run.family)].append(row)
    return {k: sorted(v, key=lambda r: r["sparsity"]) for k, v in sorted(groups.items())}


def knees(runs: list[Run]) -> dict[tuple[str, str], float | None]:
    """Essential sparsity per (method, family) curve (needs the dense perplexity)."""
    out = {}
    for key, rows in curves(runs).items():
        dense = rows[0]["dense_ppl"]
        if dense is None:
            out[key] = None
            continue
        out[key] = essential_sparsity(
            [r["sparsity"] for r in rows], [r["sparse_ppl"] for r in rows], dense
        )
    return out


def quality_png(runs: list[Run]) -> bytes:
    """Perplexity and KL-to-dense against sparsity, one line per method × pattern family,
    the essential-sparsity knee marked with a star."""
    fig = _figure(10.0, 4.2)
    ax_ppl, ax_kl = fig.subplots(1, 2)
    found = knees(runs)
    dense = next((d for d in (summary(r)["dense_ppl"] for r in runs) if d), None)
    for i, (key, rows) in enumerate(curves(runs).items()):
        label, colour = f"{key[0]} {key[1]}", f"C{i}"
        xs = [r["sparsity"] for r in rows]
        ax_ppl.plot(xs, [r["sparse_ppl"] for r in rows], "o-", color=colour, label=label)
        if all(r["kl"] is not None for r in rows):
            ax_kl.plot(xs, [r["kl"] for r in rows], "o-", color=colour, label=label)
        knee = found.get(key)
        if knee is not None:
            row = next(r for r in rows if r["sparsity"] == knee)
            ax_ppl.plot([knee], [row["sparse_ppl"]], "*", ms=16, color=colour, mec="black")
            ax_ppl.annotate(
                f"knee {knee:.2f}",
                (knee, row["sparse_ppl"]),
                fontsize=7,
                xytext=(4, 6),
                textcoords="offset points",
            )
    if dense:
        ax_ppl.axhline(dense, color="black", lw=0.8, ls="--", label=f"dense {dense:.2f}")
    ax_ppl.set(
        xlabel="sparsity (pruned layers)",
        ylabel="perplexity (log scale)",
        yscale="log",
        title="quality vs sparsity (★ = essential-sparsity knee)",
    )
    ax_kl.set(
        xlabel="sparsity (pruned layers)",
        ylabel="KL(dense ‖ sparse) per token",
        yscale="log",
        title="damage vs sparsity",
    )
    ax_ppl.legend(fontsize=7)
    if ax_kl.lines:
        ax_kl.legend(fontsize=7)
    return _png(fig)


def pareto_points(runs: list[Run]) -> tuple[str, str, list[tuple[float, float, str]]]:
    """(x label, y label, points) for the accuracy/latency plot.

    x is decode latency (ms/token) when speed was measured, else the kept share 1 -
    sparsity (a stand-in: without a sparse kernel fewer weights do not mean less time);
    y is the mean task accuracy when tasks ran, else perplexity.
    """
    rows = [row for row in map(summary, runs) if row["sparse_ppl"] is not None]
    timed = all(r["decode_tok_s"] for r in rows)
    tasks = all(r["task_avg"] is not None for r in rows)
    xlabel = "decode ms/token (batch 1)" if timed else "1 - sparsity (kept share)"
    ylabel = "mean task accuracy" if tasks else "perplexity"
    pts = [
        (
            1000.0 / r["decode_tok_s"] if timed else 1.0 - r["sparsity"],
            r["task_avg"] if tasks else r["sparse_ppl"],
            r["run"],
        )
        for r in rows
    ]
    return xlabel, ylabel, pts


def pareto_front(points: list[tuple[float, float, str]], higher_is_better: bool) -> list[int]:
    """Indices of points no other point beats on both cost (x, lower) and quality (y)."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, (x, y, _) in enumerate(points):
        dominated = any(
            (x2 <= x and sign * y2 >= sign * y) and (x2 < x or sign * y2 > sign * y)
            for j, (x2, y2, _) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_png(runs: list[Run]) -> bytes:
    """Quality against cost for every run, the Pareto front joined."""
    xlabel, ylabel, pts = pareto_points(runs)
    higher = ylabel != "perplexity"
    front = pareto_front(pts, higher)
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    for i, (x, y, name) in enumerate(pts):
        ax.plot([x], [y], "o", color="C3" if i in front else "C7")
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.plot(
        [pts[i][0] for i in front],
        [pts[i][1] for i in front],
        "-",
        color="C3",
        label="Pareto front",
    )
    ax.set(
        xlabel=xlabel,
        ylabel=ylabel,
        title="quality / cost trade-off",
        yscale="linear" if higher else "log",
    )
    ax.legend(fontsize=7)
    return _png(fig)
