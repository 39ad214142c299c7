"""Evaluation: metrics, the MagicBrush protocol, InstructPix2Pix's CLIP trade-off curves."""
