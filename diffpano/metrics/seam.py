"""Seam discontinuity: the colour and gradient jump where longitude wraps (column W-1 to 0) versus interior columns,
and the literature's discontinuity score DS (Christensen et al., ECCV 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpano.metrics.images import float_images

EPS = 1e-6
GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as OpenCV's RGB-to-gray
# Scharr's horizontal derivative, divided by the sum of its positive weights (16) as the reference code does.
SCHARR_X = torch.tensor([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]]) / 16


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


def boundary_discontinuity(images) -> torch.Tensor:
    """DS of every column boundary (N, W): entry c is the mean |Scharr x-gradient| of the gray image (0..255) on the
    two columns that straddle the boundary between columns c-1 and c (mod W), over all rows (padded by replication).

    Each of the two gradient columns reads pixels on both sides of the boundary (a strip of two columns each side);
    entry 0 is the longitude seam.
    """
    x = float_images(images) * 255
    gray = torch.einsum("nchw,c->nhw", x, torch.tensor(GRAY, dtype=x.dtype))[:, None]
    padded = F.pad(F.pad(gray, (1, 1, 0, 0), mode="circular"), (0, 0, 1, 1), mode="replicate")
    column = F.conv2d(padded, SCHARR_X.to(x.dtype)[None, None]).abs().mean(dim=(1, 2))  # (N, W), centred on k
    return (torch.roll(column, 1, dims=-1) + column) / 2


def discontinuity_scores(images) -> dict:
    """DS at the seam (`seam_ds`) and its mean over every other column boundary (`seam_ds_interior`), for scale:
    a seamless generator has seam_ds close to seam_ds_interior."""
    ds = boundary_discontinuity(images)
    return {"seam_ds": float(ds[:, 0].mean()), "seam_ds_interior": float(ds[:, 1:].mean())}
