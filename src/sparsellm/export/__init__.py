"""Saving and loading sparse models."""
