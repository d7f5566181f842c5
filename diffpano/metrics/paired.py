"""Paired metrics of generated against ground-truth panoramas: PSNR, SSIM (circular in longitude). LPIPS: lpips.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from diffpano.metrics.images import float_images

PSNR_CAP = 100.0  # dB; identical images have infinite PSNR
SSIM_PAD = 5  # half-width of torchmetrics' default 11-tap Gaussian window (sigma 1.5)


def same_shape_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred and target in [0, 1] float64, or raise ValueError unless they have the same shape."""
    p = float_images(pred, name="pred", dtype=torch.float64, layout="nchw")
    t = float_images(target, name="target", dtype=torch.float64, layout="nchw")
    if p.shape != t.shape:
        raise ValueError(f"pred/target: shapes differ, {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image pair, (N,) float64, peak 1.0; math.inf where the images are identical."""
    p, t = same_shape_pair(pred, target)
    mse = (p - t).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, circular: bool = True) -> torch.Tensor:
    """SSIM per image pair, (N,) float64 (torchmetrics, Gaussian 11x11, data_range 1).

    With circular=True the Gaussian window wraps in longitude (docs/geometry.md) instead of reflecting at columns 0
    and W-1; rows are reflected at the poles either way.
    """
    p, t = same_shape_pair(pred, target)
    if not circular:
        return structural_similarity_index_measure(p, t, data_range=1.0, reduction="none").double()
    pad = (SSIM_PAD, SSIM_PAD, 0, 0)
    _, full_map = structural_similarity_index_measure(
        F.pad(p, pad, mode="circular"), F.pad(t, pad, mode="circular"), data_range=1.0, reduction="none",
        return_full_image=True,
    )
    return full_map[..., SSIM_PAD:-SSIM_PAD].mean(dim=(1, 2, 3)).double()


def paired_metrics(pred: torch.Tensor, target: torch.Tensor, circular: bool = True) -> dict:
    """Mean PSNR and SSIM of generated vs ground-truth panoramas (N, C, H, W), uint8 or float in [0, 1].

    Rule for identical pairs (infinite PSNR): `psnr` is the plain mean of the per-image PSNRs, so it is math.inf as
    soon as one pair is identical (and when all are); `psnr_capped` caps every per-image PSNR at PSNR_CAP (100 dB)
    before averaging, so it is always finite and comparable; `identical` counts the identical pairs.
    """
    per_psnr = psnr(pred, target)
    per_ssim = ssim(pred, target, circular)
    return {
        "psnr": float(per_psnr.mean()),
        "psnr_capped": float(per_psnr.clamp(max=PSNR_CAP).mean()),
        "ssim": float(per_ssim.mean()),
        "identical": int(torch.isinf(per_psnr).sum()),
        "n": int(per_psnr.shape[0]),
    }
