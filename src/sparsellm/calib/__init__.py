"""Calibration glue: hooks and sequential block-by-block propagation."""
