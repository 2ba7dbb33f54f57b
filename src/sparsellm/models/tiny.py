"""Tiny random causal LMs built in code, one per supported family.

Unit tests and examples use these instead of downloads: they are seeded, run in
milliseconds on a CPU and exercise the same HF modelling code as the real models.
The byte-level tokenizer lets text-driven code paths (corpora, CLI) run on them too.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256  # byte-level tokenizer: one id per byte

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tiny_config(family: str, layers: int = 2) -> PretrainedConfig:
    """Config of a tiny model of `family` (llama, mistral, qwen2, qwen3, gemma3_text, gpt2)
    with `layers` blocks (gemma3_text alternates sliding-window and full-attention ones)."""
    common = {**_COMMON, "num_hidden_layers": layers}
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if family == "gemma3_text":
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=16,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"no tiny builder for {family!r}")


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A seeded, randomly initialised tiny causal LM in fp32, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), dtype=torch.float32)
    # HF initialises with std 0.02; widen so that tiny models have non-trivial activations.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-symbol byte-level tokenizer (no merges), matching `VOCAB`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])
