"""Render a Result as terminal tables and a Markdown report (any kind of run)."""

from __future__ import annotations

from typing import Any

from sparsellm.result import Result


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table (also readable in a terminal)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _second_metric(r: dict[str, Any]) -> str:
    """The metric beside accuracy: acc_norm (multiple choice), bits/byte (QA), or
    accuracy per length (long context)."""
    if "acc_norm" in r:
        return f"acc_norm {r['acc_norm']:.3f}"
    if "bpb" in r:
        return f"bpb {r['bpb']:.3f}"
    if "by_length" in r:
        return " ".join(f"{n}:{a:.2f}" for n, a in r["by_length"].items())
    return ""


def zeroshot_table(sparse: dict[str, Any], dense: dict[str, Any] | None = None) -> str:
    """Per-task accuracy ± stderr and a second metric, the dense model beside when given.

    "acc" is exact-match for QA tasks and retrieval accuracy for long-context tasks.
    """
    prefixes = ["dense ", "sparse "] if dense else [""]
    headers = ["task", "docs"] + [f"{p}{m}" for p in prefixes for m in ("acc", "other")]
    rows = []
    for task, res in sparse.items():
        row: list[Any] = [task, res["docs"]]
        for r in [dense[task], res] if dense else [res]:
            row += [f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}", _second_metric(r)]
        rows.append(row)
    return table(headers, rows)


def speed_table(speed: dict[str, Any]) -> str:
    """Tokens/s of both models and the sparse/dense speedup per case."""
    cases = [(f"prefill {n}", e) for n, e in speed["prefill"].items()]
    cases.append((f"decode {speed['decode']['tokens']} tokens (batch 1)", speed["decode"]))
    rows = [
        [name, e["dense_tok_s"], e["sparse_tok_s"], f"{e['speedup']:.3f}x"] for name, e in cases
    ]
    mem = speed["dense_params"], speed["sparse_params"]
    rows.append(["parameter MiB", mem[0]["bytes"] / 2**20, mem[1]["bytes"] / 2**20, ""])
    rows.append(["zero parameters", mem[0]["zeros"], mem[1]["zeros"], ""])
    if "memory" in speed:  # each model alone in a fresh process
        m = speed["memory"]
        d, s = m["dense"], m["sparse"]
        for key, label in (
            ("checkpoint_bytes", "checkpoint MiB on disk"),
            ("peak_rss_bytes", f"peak RSS MiB (load + prefill {m['prefill_length']})"),
        ):
            if d.get(key) is not None and s.get(key) is not None:
                rows.append([label, d[key] / 2**20, s[key] / 2**20, f"{s[key] / d[key]:.3f}x"])
    return table(["case", "dense", "sparse", "speedup or size ratio"], rows)


# what "before" / "after" / "sparsity" mean for each kind of Result
SIDES = {
    "recover": ("before recovery", "recovered"),
    "shrink": ("dense", "shrunk"),
    "eval": ("", "model"),
}
SPARSITY_LABEL = {
    "shrink": "block parameters removed",
    "activate": "weight reads skipped (eval windows)",
}


def quality_table(result: Result) -> str:
    """Before vs after: perplexity, KL and top-1 to the dense model, sparsity, time."""
    before_label, after_label = SIDES.get(result.kind, ("dense", "sparse"))
    before, after = result.metric("before", "ppl"), result.metric("after", "ppl")
    corpus = ((result.provenance.get("eval") or {}).get("data") or {}).get("name", "?")
    seconds = sum(result.timings.values()) if result.timings else None
    rows = [
        [
            f"perplexity ({corpus})",
            before,
            after,
            f"{(after / before - 1) * 100:+.2f}%" if before and after else "n/a",
        ],
        ["KL(dense ‖ after) per token", "", result.metric("comparison", "kl"), ""],
        ["top-1 agreement with dense", "", result.metric("comparison", "top1_agreement"), ""],
        [
            SPARSITY_LABEL.get(result.kind, "sparsity (pruned layers)"),
            "",
            result.measured_sparsity,
            "",
        ],
        ["seconds (" + ", ".join(result.timings) + ")", "", seconds, ""],
    ]
    return table(["metric", before_label, after_label, "change"], rows)


def tasks_section(result: Result) -> list[str]:
    """The task table (changed model, its reference beside when measured), or nothing."""
    after = result.metric("after", "tasks")
    if not after:
        return []
    return ["## Tasks\n" + zeroshot_table(after, result.metric("before", "tasks"))]


def _windows(part: dict[str, Any], count_key: str) -> str:
    return f"{part['data']['name']}: first {part[count_key]} windows × {part['seqlen']} tokens"


def protocol_rows(result: Result) -> list[list[Any]]:
    """The provenance a reader needs to reproduce the numbers, as table rows."""
    p = result.provenance
    rows: list[list[Any]] = []
    if p.get("calib"):
        rows.append(["calibration", _windows(p["calib"], "nsamples")])
        rows.append(["calibration dtype", p["calib"].get("dtype")])
    if p.get("eval"):
        rows.append(["evaluation", _windows(p["eval"], "windows")])
    rows.append(["seed", p.get("seed")])
    return rows + [[k, v] for k, v in (p.get("versions") or {}).items()]


def markdown_report(result: Result) -> str:
    """The report.md written next to a saved model."""
    import json

    steps = result.recipe.get("steps") or []
    attention = {k: v for k, v in (result.recipe.get("attention") or {}).items() if v}
    recipe = [f"- `{json.dumps(s)}`" for s in steps]
    recipe += [f"- attention {k}: `{json.dumps(v)}`" for k, v in attention.items()]
    layer_rows = [
        [name, v["method"], v["target"], v["sparsity"]]
        for name, v in (result.sparsity.get("layers") or {}).items()
    ]
    model = (result.provenance.get("model") or {}).get("source", "?")
    speed = result.details.get("speed")
    sections = [
        f"# sparsellm {result.kind}: {model}",
        quality_table(result),
        *tasks_section(result),
        *(["## Speed\n" + speed_table(speed)] if speed else []),
        "## Recipe\n" + ("\n".join(recipe) or "(none)"),
        "## Protocol\n" + table(["what", "value"], protocol_rows(result)),
    ]
    if layer_rows:
        sections.append(
            "## Per-layer sparsity\n" + table(["layer", "method", "target", "measured"], layer_rows)
        )
    return "\n\n".join(sections) + "\n"
