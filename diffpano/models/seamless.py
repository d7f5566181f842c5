"""Circular longitude padding for convolutions, so that panoramas have no seam (docs/geometry.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MARK = "_diffpano_seamless"
_WRAP_MARK = "_diffpano_seamless_wrap"


def _pad_longitude(module: nn.Conv2d, args: tuple) -> tuple:
    """Forward pre-hook: wrap the input around in width before a conv that pads only in height."""
    pad = getattr(module, _MARK)
    return (F.pad(args[0], (pad, pad, 0, 0), mode="circular"),) + tuple(args[1:])


def _wrap_right_column(module: nn.Conv2d, args: tuple) -> tuple:
    """Forward pre-hook: the zero column a Downsample2D padded on the right becomes a copy of column 0 (wrapped)."""
    x = args[0]
    return (torch.cat((x[..., :-1], x[..., :1]), dim=-1),) + tuple(args[1:])


def make_seamless(model: nn.Module) -> nn.Module:
    """Make every padded Conv2d of `model` pad circularly in width (longitude) and with zeros in height.

    That includes the convs of diffusers' Downsample2D with padding 0 (the VAE encoder's), which pad one zero column
    on the right themselves. Weights and state-dict keys are unchanged, so pretrained checkpoints load as before;
    calling it twice is harmless.
    """
    for down in model.modules():
        # diffusers' Downsample2D, matched by name so that this module does not import diffusers
        padded_right = type(down).__name__ == "Downsample2D" and down.use_conv and down.padding == 0
        if padded_right and not hasattr(down.conv, _WRAP_MARK):
            setattr(down.conv, _WRAP_MARK, True)
            down.conv.register_forward_pre_hook(_wrap_right_column)
    for conv in model.modules():
        if not isinstance(conv, nn.Conv2d) or hasattr(conv, _MARK) or conv.padding_mode != "zeros":
            continue
        ph, pw = (conv.padding, conv.padding) if isinstance(conv.padding, int) else conv.padding
        if isinstance(ph, str) or pw == 0:
            continue
        conv.padding = (ph, 0)
        setattr(conv, _MARK, pw)
        conv.register_forward_pre_hook(_pad_longitude)
    return model


def is_seamless(model: nn.Module) -> bool:
    """True when at least one conv of `model` pads circularly in longitude."""
    return any(hasattr(m, _MARK) or hasattr(m, _WRAP_MARK) for m in model.modules())
