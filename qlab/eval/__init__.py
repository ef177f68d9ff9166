"""Evaluation: validation loss and bits per byte (standard and sliding window)."""
