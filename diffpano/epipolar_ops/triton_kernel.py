"""The EA operator as Triton kernels for CUDA (placeholder until written)."""

from __future__ import annotations


def available() -> bool:
    """Whether Triton kernels can run here."""
    return False
