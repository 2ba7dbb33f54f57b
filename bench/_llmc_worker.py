"""Run llm-compressor's one-shot Wanda / SparseGPT pruning for a side-by-side comparison.

bench/vs_llmcompressor.py calls this with the interpreter of a separate venv, because
llmcompressor pins its own transformers/torch and cannot live in the sparsellm venv.
It prunes every nn.Linear inside the decoder blocks (never lm_head or embeddings) with
the given pre-tokenized calibration windows, times only ``oneshot``, measures the
sparsity / N:M validity it produced and the perplexity on the eval windows, and writes
a JSON result (also printed as the last stdout line); with --save-weights also the
pruned block weights (nothing else is saved).

llm-compressor's ``mask_structure="N:M"`` means N *zeros* in every M consecutive
weights along the input dimension (``topk(..., N, largest=False)`` is masked out);
with N:M the ``sparsity`` argument is not used.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import llmcompressor
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

BLOCK_LINEAR = re.compile(r".*\.layers\.\d+\.")  # nn.Linear inside a decoder block


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and BLOCK_LINEAR.match(n)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dense", action="store_true", help="also measure ppl before pruning")
    ap.add_argument("--save-weights", help="torch.save the pruned block linears' weights here")
    args = ap.parse_args()

    calib: torch.Tensor = torch.load(args.calib, weights_only=True).long()
    evalw: torch.Tensor = torch.load(args.eval, weights_only=True).long()
    nsamples, seqlen = calib.shape
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)  # oneshot wants a processor
    dense_ppl = perplexity(model, evalw) if args.dense else None

    layers = block_linears(model)
    outside = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." not in n}
    modifier_cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    modifier = modifier_cls(
        sparsity=args.sparsity,
        mask_structure="2:4" if args.pattern == "2:4" else "0:0",
        targets=["Linear"],
        ignore=["re:.*lm_head"],  # default targets would also prune (tied) lm_head
    )
    # Pre-built loader: in order, batch 1, no re-tokenization. (With a Dataset and
    # shuffle off, oneshot's LengthAwareSampler argsorts equal lengths -> reordered.)
    rows = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    loader = DataLoader(rows, batch_size=1, shuffle=False, collate_fn=default_data_collator)

    # Record the data and decoder-layer call order oneshot really used (skip the meta
    # tensors of its tracing pass).
    seen_ids: list[torch.Tensor] = []
    layer_calls: list[int] = []

    def record(into: list, item: object | None = None) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
            if x.device.type != "meta":
                into.append(x if item is None else item)

        return hook

    decoder = model.get_decoder()
    hooks = [decoder.embed_tokens.register_forward_pre_hook(record(seen_ids), with_kwargs=True)]
    for i, layer in enumerate(decoder.layers):
        hooks.append(layer.register_forward_pre_hook(record(layer_calls, i), with_kwargs=True))

    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=modifier,
        dataset=loader,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        pipeline="sequential",
        output_dir=None,
    )
    prune_seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()

    assert torch.equal(torch.cat(seen_ids[:nsamples]), calib), "calibration data altered"
    nlayers = len(decoder.layers)
    # sequential + error propagation: each layer runs 2n times (calibrate, then propagate
    # with pruned weights) before the next layer starts.
    expected = [i for i in range(nlayers) for _ in range(2 * nsamples)]
    assert layer_calls == expected, "oneshot did not run the sequential pipeline"
    for n, p in model.named_parameters():
        if n in outside:
            assert torch.equal(p, outside[n]), f"{n} outside the decoder blocks was modified"

    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    nm_valid = nm_extra = None
    if args.pattern == "2:4":
        # zeros per group of 4 consecutive weights along the input dim (dim 1)
        groups = [
            (m.weight.reshape(m.weight.shape[0], -1, 4) == 0).sum(-1) for m in layers.values()
        ]
        nm_valid = all(bool((g >= 2).all()) for g in groups)  # <= 2 nonzeros everywhere
        # groups with > 2 zeros, e.g. from weights already exactly 0 in the dense model
        nm_extra = sum(int((g > 2).sum()) for g in groups)

    result = {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "method": args.method,
        "pattern": args.pattern,
        "sparsity_target": args.sparsity,
        "measured_sparsity": zeros / total,
        "nm_valid": nm_valid,
        "nm_groups_over_2_zeros": nm_extra,
        "prune_seconds": prune_seconds,
        "sparse_ppl": perplexity(model, evalw),
        "dense_ppl": dense_ppl,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "pipeline": "sequential",
        "pruned_linears": len(layers),
    }
    if args.save_weights:  # lets the caller score the peer's model with its own harness
        torch.save({f"{n}.weight": m.weight.detach() for n, m in layers.items()}, args.save_weights)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
