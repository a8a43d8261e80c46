"""Evaluating trained checkpoints: the inference-time probe (`python -m run.probe`)."""
