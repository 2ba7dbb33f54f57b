"""Evaluation: perplexity (and, later, zero-shot, long-context, KL, speed)."""
