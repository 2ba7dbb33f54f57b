"""Sparse pre-training at tiny scale: SPDF and The Journey Matters (see docs/pretraining.md)."""
