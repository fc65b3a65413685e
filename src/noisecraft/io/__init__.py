"""Checkpoints: the native format, atomic writes, safe loading."""
