"""LPIPS (Zhang et al. 2018) on AlexNet, VGG16 or SqueezeNet 1.1 features, without torchvision.

The backbones are rebuilt here layer for layer, so a torchvision state_dict (alexnet-owt-7be5be79.pth, ...) loads
into them by its `features.*` keys. The linear layers are LPIPS v0.1's, as packaged with torchmetrics.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics.functional.image as tm_image
from torch import nn

from diffpano.metrics.features import MissingWeights
from diffpano.metrics.paired import same_shape_pair

LIN_WEIGHTS_DIR = Path(tm_image.__file__).parent / "lpips_models"
# LPIPS' ImageNet statistics, for inputs in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-8


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expansions side by side."""

    def __init__(self, inplanes: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated ReLU outputs of both expansions."""
        x = F.relu(self.squeeze(x))
        return torch.cat((F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))), dim=1)


def _alexnet() -> list[nn.Module]:
    """torchvision's alexnet().features up to its last ReLU."""
    return [
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
    ]


def _vgg16() -> list[nn.Module]:
    """torchvision's vgg16().features up to its last ReLU."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        channels = width
    return layers


def _squeezenet1_1() -> list[nn.Module]:
    """torchvision's squeezenet1_1().features."""
    return [
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(64, 16, 64), Fire(128, 16, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(128, 32, 128), Fire(256, 32, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256),
    ]


@dataclass(frozen=True)
class Backbone:
    """A backbone: its torchvision name, its layers, the layers LPIPS reads (taps), their widths, the least side."""

    torchvision_name: str
    layers: Callable[[], list[nn.Module]]
    taps: tuple[int, ...]
    widths: tuple[int, ...]
    min_size: int  # pixels; below it a pooling layer has nothing left to pool


BACKBONES = {
    "alex": Backbone("alexnet", _alexnet, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256), 31),
    "vgg": Backbone("vgg16", _vgg16, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512), 16),
    "squeeze": Backbone(
        "squeezenet1_1", _squeezenet1_1, (1, 4, 7, 9, 10, 11, 12), (64, 128, 256, 384, 384, 512, 512), 17
    ),
}


class ImagesTooSmall(ValueError):
    """Images smaller than the LPIPS backbone's least side."""


def _unit_channels(x: torch.Tensor) -> torch.Tensor:
    """Each feature vector scaled to unit length along channels (LPIPS' normalisation, with its epsilon)."""
    return x / torch.sqrt(NORM_EPS + x.pow(2).sum(dim=1, keepdim=True))


class Lpips(nn.Module):
    """LPIPS distance between image pairs in [0, 1]: weighted, normalised feature differences, spatially averaged."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"net: expected one of {', '.join(BACKBONES)}, got {net!r}")
        self.net = net
        self.backbone = BACKBONES[net]
        self.features = nn.Sequential(*self.backbone.layers())
        self.lins = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in self.backbone.widths)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def tapped(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's activations at the tapped layers."""
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.backbone.taps:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS per pair, (N,), of images (N, 3, H, W) in [0, 1]."""
        fa, fb = (self.tapped((x * 2 - 1 - self.shift) / self.scale) for x in (a, b))
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for feat_a, feat_b, lin in zip(fa, fb, self.lins, strict=True):
            total = total + lin((_unit_channels(feat_a) - _unit_channels(feat_b)).pow(2)).mean(dim=(1, 2, 3))
        return total


def _state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict read from a torch file on the CPU, or ValueError naming the file."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for files that are not state_dicts
        raise ValueError(f"lpips weights: {path} is not a torch state_dict file ({type(err).__name__})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"lpips weights: {path} does not hold a state_dict of tensors")
    return state


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load state into module, or ValueError naming what and the first missing or mis-shaped key."""
    expected = module.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise ValueError(f"{what} (no {key})")
        if state[key].shape != value.shape:
            raise ValueError(f"{what} ({key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)})")
    module.load_state_dict({key: state[key] for key in expected})


def load_lpips(weights: str | os.PathLike, net: str = "alex") -> Lpips:
    """LPIPS with the backbone from a local torchvision state_dict and LPIPS v0.1's linear layers; never downloads."""
    if not weights or not os.path.isfile(weights):
        raise MissingWeights.of("lpips_weights", f"{weights} is not a file" if weights else "no path given")
    model = Lpips(net)
    name = model.backbone.torchvision_name
    features = {k.removeprefix("features."): v for k, v in _state_dict(weights).items() if k.startswith("features.")}
    _load_exact(model.features, features, f"lpips weights: {weights} is not a torchvision {name} state_dict")
    lin_path = LIN_WEIGHTS_DIR / f"{net}.pth"
    lins = {k.removeprefix("lin").replace(".model.1.", "."): v for k, v in _state_dict(lin_path).items()}
    _load_exact(model.lins, lins, f"lpips linear layers: {lin_path} does not match LPIPS v0.1 {net}")
    return model.eval().requires_grad_(False)


def lpips(
    pred: torch.Tensor, target: torch.Tensor, weights: str | os.PathLike | Lpips | None = None, net: str = "alex",
    batch_size: int = 16,
) -> torch.Tensor:
    """LPIPS per image pair, (N,) float64, of RGB images uint8 or float in [0, 1].

    `weights` is a loaded Lpips or a local torchvision backbone state_dict (e.g. alexnet-owt-7be5be79.pth for net
    'alex'); without one it raises MissingWeights. Never downloads.
    """
    model = weights if isinstance(weights, Lpips) else load_lpips(weights, net)
    p, t = same_shape_pair(pred, target)
    if p.shape[1] != 3:
        raise ValueError(f"pred/target: LPIPS needs RGB images (N, 3, H, W), got {tuple(p.shape)}")
    side, (height, width) = model.backbone.min_size, p.shape[-2:]
    if min(height, width) < side:
        raise ImagesTooSmall(f"pred/target: LPIPS ({model.net}) needs images of at least {side}x{side} pixels, "
                             f"got {height}x{width}")
    with torch.inference_mode():
        out = [model(a.float(), b.float()) for a, b in zip(p.split(batch_size), t.split(batch_size), strict=True)]
    return torch.cat(out).double()
