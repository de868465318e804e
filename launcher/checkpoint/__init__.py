"""Checkpoints (save, resume, world-size changes) and the adapter export."""
