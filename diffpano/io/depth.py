"""Depth maps as files: 16-bit PNGs in millimetres (docs/geometry.md), for datasets and for tours made on a
geometry."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

DEPTH_SCALE = 1000.0  # docs/geometry.md: depth PNGs hold millimetres
MAX_DEPTH_M = 65.535


def depth_png_bytes(depth: np.ndarray) -> bytes:
    """16-bit PNG of a range map in metres, stored in millimetres; unknown, non-finite or out-of-range → 0."""
    depth = np.asarray(depth, dtype=np.float64)
    ok = np.isfinite(depth) & (depth > 0) & (depth <= MAX_DEPTH_M)
    mm = np.where(ok, np.round(np.where(ok, depth, 0) * DEPTH_SCALE), 0).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG")
    return buf.getvalue()


def decode_depth(data: bytes) -> np.ndarray:
    """Range map in metres (float32, 0 = unknown) of a 16-bit millimetre PNG."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im, dtype=np.float32) / DEPTH_SCALE
