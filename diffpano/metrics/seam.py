"""Seam discontinuity: the colour and gradient jump where longitude wraps (column W-1 to 0) versus interior columns."""

from __future__ import annotations

import torch

from diffpano.metrics.images import float_images

EPS = 1e-6


def column_jumps(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |colour step| and |gradient step| (second difference) between each column and the next, wrapping.

    Entry k compares columns k and k+1 (mod W); entry W-1 is the seam. Shapes (N, W).
    """
    step = torch.roll(x, -1, dims=-1) - x  # step[..., k] = x[k+1] - x[k]
    curve = torch.roll(step, -1, dims=-1) - step  # change of the step around column k+1
    colour = step.abs().mean(dim=(1, 2))
    gradient = torch.roll(curve, 1, dims=-1).abs().mean(dim=(1, 2))  # centred on the same column pair as colour
    return colour, gradient


def seam_scores(images) -> dict:
    """Seam colour and gradient jumps relative to the mean interior column pair (1 = as smooth as the inside)."""
    x = float_images(images)
    colour, gradient = column_jumps(x)
    inner_c, inner_g = colour[:, :-1].mean(-1), gradient[:, 1:-1].mean(-1)
    seam_c = colour[:, -1] / (inner_c + EPS)
    seam_g = torch.maximum(gradient[:, -1], gradient[:, 0]) / (inner_g + EPS)
    return {
        "seam_colour_ratio": float(seam_c.mean()),
        "seam_gradient_ratio": float(seam_g.mean()),
        "seam_colour_jump": float(colour[:, -1].mean()),
    }
