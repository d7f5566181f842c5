"""The one image normaliser of the metrics: uint8 or float images, (N, H, W, 3) or (N, 3, H, W), to float tensors.

Every metric takes images as uint8 (0..255) or float in [0, 1], channels last (numpy, as the pipeline returns them)
or first (torch), and turns them into float (N, 3, H, W) tensors in one of two named ranges:
- "unit": [0, 1] (PSNR, SSIM, consistency, seam, adherence);
- "signed": [-1, 1] (the FAED autoencoder, the small FID stand-in; what diffusion models see).
Resizing is area averaging (a low-pass: shrinking a panorama does not alias) or antialiased bilinear (Inception's).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

RANGES = ("unit", "signed")
LAYOUTS = ("auto", "nchw")
RESIZE_MODES = ("area", "bilinear")


def channels_first(images: np.ndarray | torch.Tensor, name: str = "images", layout: str = "auto",
                   single: bool = False) -> torch.Tensor:
    """A (N, C, H, W) tensor of images, dtype unchanged (no copy when none is needed).

    layout "auto": (N, H, W, 3) or (N, 3, H, W) arrays or tensors, channels moved first when last; "nchw": tensors
    already (N, C, H, W), any C. With single=True a lone image (H, W, 3) / (3, H, W) gets a batch axis.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "nchw":
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{name}: expected a tensor of shape (N, C, H, W), got {got}")
        return images
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if single and x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"{name}: expected (N, H, W, 3) or (N, 3, H, W) images, got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2) if x.shape[-1] == 3 and x.shape[1] != 3 else x


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Float images (N, C, H, W) resized to size (h, w): area averaging, or bilinear antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "area":
        return F.interpolate(x, size=tuple(size), mode="area")
    if mode == "bilinear":
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"mode: expected one of {', '.join(RESIZE_MODES)}, got {mode!r}")


def scale_values(x: torch.Tensor, value_range: str = "unit", dtype: torch.dtype = torch.float32,
                 name: str = "images", check_range: bool = False) -> torch.Tensor:
    """Image values of any shape as dtype in value_range ("unit" [0, 1] or "signed" [-1, 1]).

    uint8 values are scaled from 0..255, float values are taken to be in [0, 1] (check_range=True raises when they
    are not, e.g. model-space tensors in [-1, 1]); other dtypes raise. Errors are ValueErrors naming `name`.
    """
    if value_range not in RANGES:
        raise ValueError(f"value_range: expected one of {', '.join(RANGES)}, got {value_range!r}")
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255 if value_range == "unit" else x.to(dtype) / 127.5 - 1
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected uint8 or float in [0, 1], got {x.dtype}")
    x = x.to(dtype)
    if check_range and x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"{name}: float images must be in [0, 1], got [{x.min():.3f}, {x.max():.3f}]")
    return x * 2 - 1 if value_range == "signed" else x


def float_images(
    images: np.ndarray | torch.Tensor, value_range: str = "unit", *, name: str = "images",
    dtype: torch.dtype = torch.float32, layout: str = "auto", single: bool = False, check_range: bool = False,
    size: tuple[int, int] | None = None, resize_mode: str = "area",
) -> torch.Tensor:
    """Float (N, 3, H, W) images of dtype in value_range: channels_first, then scale_values, then resize.

    The one entry point of the metrics: layout and `single` as channels_first (layout "nchw" keeps any C),
    value_range, dtype and check_range as scale_values; with `size` (h, w) the result is resized (resize_mode as
    resize). Errors are ValueErrors naming `name`.
    """
    x = scale_values(channels_first(images, name, layout, single), value_range, dtype, name, check_range)
    return x if size is None else resize(x, size, resize_mode)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images unchanged; float images in [0, 1] scaled to 0..255 and rounded."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images: expected uint8 or float in [0, 1], got {images.dtype}")
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def resize_uint8(images: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, 3, h, w) of uint8 (N, H, W, 3) / (N, 3, H, W) images, area-averaged in 0..255 and rounded."""
    x = channels_first(images)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return resize(x.float(), size).round().clamp(0, 255).to(torch.uint8)
