"""Sparse pre-training at tiny scale: SPDF and The Journey Matters, on the bundled corpora.

Tiny Llama-style models (4 blocks, byte-level tokens, hidden `--sizes`) are trained from
scratch for the same token budget (`--steps` × `--batch-size` windows of 128 bytes of
c4), then scored on held-out c4 windows (bits per byte):

* The Journey Matters: a dense model of every size, and the largest size pruned
  gradually by magnitude (cubic schedule from 25% to 75% of training) to each of
  `--final`. The dense runs give the law loss(log N); a sparse run's residual against
  it is read at its average parameter count N̄ and at its final count. The paper's
  claim holds when N̄ predicts it better (smaller |residual|).
* SPDF: at `--spdf-size`, dense pre-training and static random sparsity of each of
  `--final`, each then fine-tuned dense on wiki for `--ft-steps` steps; wiki loss before
  and after fine-tuning beside the pre-training FLOPs of the block linears.

Writes results/<--name>.json (rows) through bench/provenance.py and a plot of loss vs
average parameter count next to it (results/<--name>.png).

    python bench/pretrain.py [--steps 400] [--sizes 64,96,128,192] [--final 0.5,0.75]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import RESULTS_DIR, write_result  # noqa: E402

from sparsellm.data.corpora import resolve_corpus, token_windows  # noqa: E402
from sparsellm.models.tiny import VOCAB, byte_tokenizer  # noqa: E402
from sparsellm.pretrain.journey import GradualMagnitude, average_params  # noqa: E402
from sparsellm.pretrain.spdf import random_masks, train_flops  # noqa: E402
from sparsellm.pretrain.train import TrainConfig, eval_loss, linear_weights, train_lm  # noqa: E402

SEQLEN = 128
BITS = 1 / math.log(2)  # nats -> bits (per byte: one token is one byte)


def tiny_llama(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQLEN,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def n_linear(model: torch.nn.Module) -> int:
    return sum(w.numel() for w in linear_weights(model).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,96,128,192", help="hidden sizes of the dense runs")
    ap.add_argument("--final", default="0.5,0.75", help="final sparsities")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--spdf-size", type=int, default=128)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--val", type=int, default=64, help="held-out windows per corpus")
    ap.add_argument("--name", default="pretrain-tiny")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    finals = [float(x) for x in args.final.split(",")]
    tok = byte_tokenizer()
    c4 = token_windows(tok, resolve_corpus("c4"), 10_000, SEQLEN)
    c4_train, c4_val = c4[: -args.val], c4[-args.val :]
    wiki = token_windows(tok, resolve_corpus("wiki"), 2 * 4096, SEQLEN)
    wiki_train, wiki_val = wiki[: -args.val], wiki[-args.val :]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    ft_cfg = TrainConfig(steps=args.ft_steps, batch_size=args.batch_size, lr=args.lr / 3, warmup=10)
    tokens = args.steps * args.batch_size * SEQLEN
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print({k: v for k, v in row.items() if v is not None}, flush=True)
        write_result(args.name, {"rows": rows, "tokens": tokens, "steps": args.steps})

    def pretrain(hidden: int, masks_for=None) -> tuple[torch.nn.Module, dict]:
        model = tiny_llama(hidden, seed=0)
        masks = masks_for(model) if masks_for else None
        log = train_lm(model, c4_train, cfg, masks)
        full = n_linear(model)
        avg = average_params(log.kept) if masks else float(full)
        final = masks.kept() if masks else full
        flops = sum(
            train_flops(k, args.batch_size * SEQLEN) for k in (log.kept or [full] * cfg.steps)
        )
        info = {
            "hidden": hidden,
            "linear params": full,
            "final params": final,
            "average params": round(avg),
            "pretrain FLOPs": flops,
            "c4 bits/byte": round(eval_loss(model, c4_val) * BITS, 4),
            "seconds": round(log.seconds, 1),
        }
        return model, info

    biggest = max(sizes)
    for h in sizes:
        model, info = pretrain(h)
        record({"study": "journey", "run": f"dense h={h}", "final sparsity": 0.0, **info})
        if h == args.spdf_size:
            spdf_dense = model
    for s in finals:
        _, info = pretrain(biggest, lambda m, s=s: GradualMagnitude(m, s, args.steps))
        record(
            {
                "study": "journey",
                "run": f"gradual h={biggest} to {s:.0%}",
                "final sparsity": s,
                **info,
            }
        )
    fit_journey(rows)
    if args.spdf_size not in sizes:
        spdf_dense, _ = pretrain(args.spdf_size)
    for s in [0.0, *finals]:
        if s:
            model, info = pretrain(args.spdf_size, lambda m, s=s: random_masks(m, s))
        else:
            model = copy.deepcopy(spdf_dense)
            info = next(r for r in rows if r["run"] == f"dense h={args.spdf_size}")
            info = {k: v for k, v in info.items() if k not in ("study", "run", "final sparsity")}
        before = eval_loss(model, wiki_val) * BITS
        ft = train_lm(model, wiki_train, ft_cfg)  # dense: every weight trains, zeros too
        record(
            {
                "study": "spdf",
                "run": f"{'sparse' if s else 'dense'} pre-train {s:.0%}, dense fine-tune",
                "final sparsity": s,
                **info,
                "wiki bits/byte before FT": round(before, 4),
                "wiki bits/byte after FT": round(eval_loss(model, wiki_val) * BITS, 4),
                "FT seconds": round(ft.seconds, 1),
            }
        )
    plot(rows, RESULTS_DIR / f"{args.name}.png")


def fit_journey(rows: list[dict]) -> None:
    """Least-squares loss = a + b·ln N over the dense runs; each gradual run gets its
    residual at N̄ and at its final N (in bits per byte), written into its row."""
    dense = [r for r in rows if r["study"] == "journey" and r["final sparsity"] == 0]
    x = torch.tensor([math.log(r["average params"]) for r in dense], dtype=torch.float64)
    y = torch.tensor([r["c4 bits/byte"] for r in dense], dtype=torch.float64)
    a = torch.stack([torch.ones_like(x), x], 1)
    coef = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]

    def law(n: float) -> float:
        return float(coef[0] + coef[1] * math.log(n))

    for r in rows:
        if r["study"] == "journey" and r["final sparsity"] > 0:
            r["law residual at N̄"] = round(r["c4 bits/byte"] - law(r["average params"]), 4)
            r["law residual at final N"] = round(r["c4 bits/byte"] - law(r["final params"]), 4)


def plot(rows: list[dict], path: Path) -> None:
    """Loss vs average parameter count: dense runs, gradual runs at N̄ and at final N."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    journey = [r for r in rows if r["study"] == "journey"]
    dense = [r for r in journey if r["final sparsity"] == 0]
    ax.plot(
        [r["average params"] for r in dense],
        [r["c4 bits/byte"] for r in dense],
        "o-",
        label="dense",
    )
    for r in journey:
        if r["final sparsity"] > 0:
            ax.plot(r["average params"], r["c4 bits/byte"], "s", label=f"{r['run']} at N̄")
            ax.plot(r["final params"], r["c4 bits/byte"], "x", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("block-linear parameters (average over training; x: final count)")
    ax.set_ylabel("held-out c4 bits per byte")
    ax.legend(fontsize=8)
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
