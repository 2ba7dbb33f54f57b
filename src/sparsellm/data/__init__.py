"""Text corpora and token windows for calibration and evaluation."""
