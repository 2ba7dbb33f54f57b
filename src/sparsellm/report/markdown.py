"""Render a prune run's result as a terminal table and a Markdown report."""

from __future__ import annotations

from typing import Any


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
        ["KL(dense ‖ sparse) per token", 0.0, result.get("kl"), ""],
        ["top-1 agreement with dense", 1.0, result.get("top1_agreement"), ""],
        ["sparsity (pruned layers)", 0.0, result["measured_sparsity"], ""],
        ["prune seconds", "", result["prune_seconds"], ""],
    ]
    return table(["metric", "dense", "sparse", "change"], rows)


def _zeroshot_section(zeroshot: dict[str, Any] | None) -> list[str]:
    if not zeroshot:
        return []
    return ["## Tasks\n" + zeroshot_table(zeroshot["sparse"], zeroshot.get("dense"))]


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
        *_zeroshot_section(result.get("zeroshot")),
        *(["## Speed\n" + speed_table(result["speed"])] if result.get("speed") else []),
        "## Recipe\n" + steps,
        "## Protocol\n" + table(["what", "value"], protocol),
        "## Per-layer sparsity\n" + table(["layer", "method", "target", "measured"], layer_rows),
    ]
    return "\n\n".join(sections) + "\n"
