"""Triton kernels, installed as `seerlib.kernels` (never a top-level `kernels` module)."""
