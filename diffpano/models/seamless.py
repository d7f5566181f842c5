"""Circular longitude padding for convolutions, so that panoramas have no seam (docs/geometry.md)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

_MARK = "_diffpano_seamless"


def _pad_longitude(module: nn.Conv2d, args: tuple) -> tuple:
    """Forward pre-hook: wrap the input around in width before a conv that pads only in height."""
    pad = getattr(module, _MARK)
    return (F.pad(args[0], (pad, pad, 0, 0), mode="circular"),) + tuple(args[1:])


def make_seamless(model: nn.Module) -> nn.Module:
    """Make every padded Conv2d of `model` pad circularly in width (longitude) and with zeros in height.

    Weights and state-dict keys are unchanged, so pretrained checkpoints load as before; calling it twice is harmless.
    """
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
    return any(hasattr(m, _MARK) for m in model.modules())
