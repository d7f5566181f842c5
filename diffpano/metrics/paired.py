"""Paired metrics of generated against ground-truth panoramas: PSNR, SSIM (circular in longitude), LPIPS."""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from diffpano.metrics.features import MissingWeights
from diffpano.metrics.images import float_images

PSNR_CAP = 100.0  # dB; identical images have infinite PSNR
SSIM_PAD = 5  # half-width of torchmetrics' default 11-tap Gaussian window (sigma 1.5)
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred and target in [0, 1] float64, or raise ValueError unless they have the same shape."""
    p = float_images(pred, name="pred", dtype=torch.float64, layout="nchw")
    t = float_images(target, name="target", dtype=torch.float64, layout="nchw")
    if p.shape != t.shape:
        raise ValueError(f"pred/target: shapes differ, {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image pair, (N,) float64, peak 1.0; math.inf where the images are identical."""
    p, t = _pair(pred, target)
    mse = (p - t).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, circular: bool = True) -> torch.Tensor:
    """SSIM per image pair, (N,) float64 (torchmetrics, Gaussian 11x11, data_range 1).

    With circular=True the Gaussian window wraps in longitude (docs/geometry.md) instead of reflecting at columns 0
    and W-1; rows are reflected at the poles either way.
    """
    p, t = _pair(pred, target)
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


def _lpips_model(weights: str | os.PathLike, net: str) -> torch.nn.Module:
    """torchmetrics' LPIPS with its packaged linear layers and the backbone loaded from a local torchvision file."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    # pnet_rand=True builds the torchvision backbone without weights, so nothing is downloaded.
    model = _NoTrainLpips(net=net, pretrained=True, pnet_rand=True)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    # torchmetrics keeps torchvision's feature layer i as sliceK.i (alex, vgg) or slices.K.i (squeeze).
    skip = 2 if net == "squeeze" else 1
    backbone = {}
    for key in model.net.state_dict():
        source = ".".join(key.split(".")[skip:])
        if source not in features:
            raise ValueError(
                f"lpips weights: {weights} is not a torchvision {LPIPS_BACKBONES[net]} state_dict "
                f"(no features.{source})"
            )
        backbone[key] = features[source]
    model.net.load_state_dict(backbone)
    return model.eval()


def lpips(
    pred: torch.Tensor, target: torch.Tensor, weights: str | os.PathLike | None = None, net: str = "alex",
    batch_size: int = 16,
) -> torch.Tensor:
    """LPIPS per image pair, (N,) float64, of RGB images uint8 or float in [0, 1].

    Needs torchvision and a local torchvision backbone state_dict (`weights`, e.g. alexnet-owt-7be5be79.pth);
    raises MissingWeights saying which is missing. Never downloads.
    """
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"net: expected one of {', '.join(LPIPS_BACKBONES)}, got {net!r}")
    if importlib.util.find_spec("torchvision") is None:
        raise MissingWeights.of("lpips_torchvision")
    if not weights or not os.path.isfile(weights):
        raise MissingWeights.of("lpips_weights", f"{weights} is not a file" if weights else "no path given")
    p, t = _pair(pred, target)
    if p.shape[1] != 3:
        raise ValueError(f"pred/target: LPIPS needs RGB images (N, 3, H, W), got {tuple(p.shape)}")
    model = _lpips_model(weights, net)
    out = []
    with torch.inference_mode():
        for a, b in zip(p.split(batch_size), t.split(batch_size), strict=True):
            out.append(model(a.float(), b.float(), normalize=True).reshape(-1).double())
    return torch.cat(out)
