"""SeerAttention's learned gate: trained on CPU, its recall on held-out text, then its
prefill beside ``block_topk`` at the same block budget.

1. Train: the gate of every full-attention layer learns from the frozen model's own
   attention on `--train-windows` C4 windows of `--length` tokens (the wall time of the
   whole step, forwards included, is reported; the issue's budget is 30 minutes).
2. Recall, on `--eval-windows` wiki windows (held out: another corpus): per query block,
   the share of the dense model's top key blocks (by max-pooled attention, the gate's own
   target) that the gate also ranks top, when `--densities` of the causal blocks are kept;
   and the mass recall: the target's mass in the gate's blocks over the most that as many
   blocks could hold (near-tied blocks swapped cost recall but little mass).
   ``block_topk``'s pooled-score estimate is scored the same way, as the baseline, and
   the gate once more on its own training windows (the generalisation gap).
3. Prefill (unless ``--no-prefill``): the trained gates are saved to a temporary file and
   ``bench/attention.py`` runs ``block_topk:blocks=N`` and ``seer:blocks=N,gate=FILE``
   (equal density: N key blocks per query block plus the sink and window) at 8192 tokens:
   prefill speedup, passkey / needle, perplexity, written as results/attention-seer-<model>.

Writes results/seer-<model>.json through bench/provenance.py. Smoke run:

    python bench/seer.py --train-windows 1 --eval-windows 1 --length 1024 --steps 20 \
        --no-prefill --name seer-smoke
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import write_result  # noqa: E402

from sparsellm.data.corpora import resolve_corpus, token_windows  # noqa: E402
from sparsellm.integrations.transformers import observe_forward  # noqa: E402
from sparsellm.methods.attention.prefill import pooled_block_probs  # noqa: E402
from sparsellm.methods.attention.seer import (  # noqa: E402
    GateTraining,
    Seer,
    gate_log_probs,
    mass_recall_at_density,
    recall_at_density,
    save_gates,
)
from sparsellm.models.load import load_model  # noqa: E402
from sparsellm.report.markdown import table  # noqa: E402


class HeldOut(GateTraining):
    """Collects held-out features and targets (never fits), and ``block_topk``'s own
    estimate of the same windows: post-RoPE mean-pooled queries against keys."""

    def __init__(self, base: Seer) -> None:
        super().__init__(base)
        self.pooled: dict[int, list[torch.Tensor]] = {}

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        super().observe(layer, query, key, scale)
        estimate = pooled_block_probs(query.float(), key.float(), self.base.block)
        self.pooled.setdefault(layer, []).append(estimate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model source (default: bundled)")
    ap.add_argument("--length", type=int, default=4096, help="tokens per window")
    ap.add_argument("--train-windows", type=int, default=8, help="C4 training windows")
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out wiki windows")
    ap.add_argument("--dim", type=int, default=64, help="gate projection width per head")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--densities", default="0.125,0.25,0.5", help="kept fraction of blocks")
    ap.add_argument("--blocks", type=int, default=16, help="key blocks per query block")
    ap.add_argument("--no-prefill", action="store_true", help="skip the attention bench step")
    ap.add_argument("--name", default=None, help="result name (default seer-<model>)")
    args = ap.parse_args()
    name = args.name or f"seer-{args.model}"
    torch.manual_seed(0)
    densities = [float(x) for x in args.densities.split(",")]
    model, tok = load_model(args.model)
    model.eval()
    base = Seer(blocks=args.blocks, dim=args.dim, steps=args.steps, lr=args.lr)
    base = base.bind(model.config)  # the rotary base the gate undoes

    t0 = time.perf_counter()
    training = base.calibration(args.length)
    train = token_windows(tok, resolve_corpus("c4"), args.train_windows, args.length)
    for i, row in enumerate(train):
        observe_forward(model, row[None], training)
        print(f"train window {i + 1}/{len(train)} observed", flush=True)
    trained = training.result(model)
    train_s = time.perf_counter() - t0
    print(f"gates trained in {train_s:.0f} s", flush=True)

    held = HeldOut(trained)
    for row in token_windows(tok, resolve_corpus("wiki"), args.eval_windows, args.length):
        observe_forward(model, row[None], held)
    metrics = {"recall": recall_at_density, "mass recall": mass_recall_at_density}
    rows, per_layer = [], {}
    # the gate on its own training windows too: how much of the held-out shortfall is
    # generalisation (a gap between the two) and how much is what the gate can express
    estimators = {
        "seer gate": (held.data, True),
        "block_topk pooled": (held.data, False),
        "seer gate, training windows": (training.data, True),
    }
    for estimator, (source, gated) in estimators.items():
        row: dict[str, object] = {"estimator": estimator}
        for density in densities:
            for metric, fn in metrics.items():
                by_layer = []
                for layer, data in sorted(source.items()):
                    got = []
                    for i, (qf, kf, truth) in enumerate(data):
                        if gated:
                            gate = trained.gates[layer]
                            scores = gate_log_probs(gate, qf, kf, trained.theta, trained.block)
                        else:
                            scores = held.pooled[layer][i]
                        got.append(fn(scores, truth, density))
                    by_layer.append(round(sum(got) / len(got), 4))
                per_layer.setdefault(estimator, {})[f"{metric}@{density:g}"] = by_layer
                row[f"{metric}@{density:g}"] = round(sum(by_layer) / len(by_layer), 4)
                if metric == "recall":
                    row[f"worst layer@{density:g}"] = min(by_layer)
        rows.append(row)
    rows[0]["train min"] = round(train_s / 60, 1)
    rows[1]["train min"] = 0.0  # block_topk estimates from the prompt, nothing learned
    rows[2]["train min"] = rows[0]["train min"]
    headers = list(rows[0])
    print(table(headers, [[r[h] for h in headers] for r in rows]))
    payload = {
        "rows": rows,
        "train": {
            "windows": args.train_windows,
            "length": args.length,
            "corpus": "c4",
            "seconds": round(train_s, 1),
            "dim": args.dim,
            "steps": args.steps,
            "lr": args.lr,
        },
        "eval": {"windows": args.eval_windows, "length": args.length, "corpus": "wiki"},
        "per_layer_recall": per_layer,
    }
    if not args.no_prefill:
        with tempfile.TemporaryDirectory() as tmp:
            gates = str(Path(tmp) / "seer-gates.safetensors")
            save_gates(trained, gates)
            methods = f"block_topk:blocks={args.blocks};seer:blocks={args.blocks},gate={gates}"
            cmd = [
                sys.executable, str(HERE / "attention.py"), "--model", args.model,
                "--methods", methods, "--lengths", "8192", "--samples", "5",
                "--speed-length", "8192", "--ppl-lengths", "8192", "--ppl-windows", "1",
                "--name", f"attention-seer-{args.model}",
            ]  # fmt: skip
            subprocess.run(cmd, check=True)
        payload["prefill_result"] = f"results/attention-seer-{args.model}.json"
    write_result(name, payload)


if __name__ == "__main__":
    main()
