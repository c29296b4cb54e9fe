"""Checkpoint conversion: any training checkpoint to one full state dict, a Hugging Face model
directory, back to a checkpoint, and between tensor-parallel layouts (docs/convert.md)."""
