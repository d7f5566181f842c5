"""FAED (PanFusion): Fréchet distance in the latent space of a seamless panorama autoencoder."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from diffpano.geometry.spherical import check_panorama_size
from diffpano.io import storage
from diffpano.metrics.distribution import RunningStats, frechet_distance
from diffpano.metrics.images import float_images, scale_values
from diffpano.models.seamless import make_seamless

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KIND = "diffpano-faed-autoencoder"
DOWNSCALE = 8


@dataclass(frozen=True)
class AutoencoderConfig:
    """Size of a PanoAutoencoder: latent channels and the widths of its three resolution levels."""

    latent_channels: int = 8
    channels: tuple[int, int, int] = (16, 32, 32)


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    """A 'same' convolution (or a halving one with kernel 4, stride 2)."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=1 if kernel in (3, 4) else kernel // 2)


class PanoAutoencoder(nn.Module):
    """Convolutional autoencoder of panoramas in [-1, 1]: (3, H, W) -> latent (C, H/8, W/8) -> (3, H, W).

    Every convolution pads circularly in longitude (make_seamless) and upsampling is nearest-neighbour, so the
    model treats column W-1 and column 0 as neighbours (docs/geometry.md).
    """

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or AutoencoderConfig()
        c1, c2, c3 = self.config.channels
        lat = self.config.latent_channels
        self.encoder = nn.Sequential(
            _conv(3, c1, 4, 2), nn.SiLU(),
            _conv(c1, c2, 4, 2), nn.SiLU(),
            _conv(c2, c3, 4, 2), nn.SiLU(),
            _conv(c3, lat),
        )
        self.decoder = nn.Sequential(
            _conv(lat, c3), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(c3, c2), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(c2, c1), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), _conv(c1, 3), nn.Tanh(),
        )
        make_seamless(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, H/8, W/8) of panoramas (B, 3, H, W) in [-1, 1]."""
        _check_size(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 3, H, W) in [-1, 1]."""
        return self.decoder(self.encode(x))


def _check_size(x: torch.Tensor) -> None:
    """Raise ValueError unless x is (B, 3, H, 2H) with H a multiple of 8."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"panoramas: expected (B, 3, H, 2H), got {tuple(x.shape)}")
    check_panorama_size(x.shape[-2], x.shape[-1], DOWNSCALE, field="panoramas")


def _item_image(item: object) -> torch.Tensor:
    """One training image as float in [-1, 1]: a PanoramaDataset dict (its 'image' is in [-1, 1]) or a tensor."""
    if isinstance(item, dict):
        return item["image"].float()
    if isinstance(item, torch.Tensor):
        return scale_values(item, "signed")
    raise TypeError(f"images: expected tensors or dicts with 'image', got {type(item).__name__}")


def _training_batches(source: object, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches (b, 3, H, W) in [-1, 1] of a tensor, a map-style dataset or a re-iterable of images."""
    if isinstance(source, torch.Tensor):
        images = float_images(source, "signed", layout="nchw")
        while True:
            yield images[torch.randint(images.shape[0], (batch_size,), generator=generator)]
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        n = len(source)
        if n == 0:
            raise ValueError("images: the dataset is empty")
        while True:
            idx = torch.randint(n, (batch_size,), generator=generator).tolist()
            yield torch.stack([_item_image(source[i]) for i in idx])
    if not isinstance(source, Iterable):
        raise TypeError(f"images: expected a tensor, a dataset or an iterable, got {type(source).__name__}")
    pending: list[torch.Tensor] = []
    while True:
        seen = False
        for item in source:
            img = _item_image(item)
            pending.extend(img if img.ndim == 4 else [img])
            seen = True
            while len(pending) >= batch_size:
                yield torch.stack(pending[:batch_size])
                pending = pending[batch_size:]
        if not seen:
            raise ValueError("images: the iterable yielded nothing")


def train_autoencoder(
    images: object,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    model: PanoAutoencoder | None = None,
    config: AutoencoderConfig | None = None,
) -> PanoAutoencoder:
    """Train (or continue training) a PanoAutoencoder with L1 reconstruction and Adam; returns it in eval mode.

    images: uint8 (N, 3, H, W) or float in [0, 1]; or a dataset/iterable of such images, of batches, or of
    PanoramaDataset dicts (whose 'image' is in [-1, 1]). progress(step, loss) is called after every step.
    """
    if steps < 0 or batch_size <= 0:
        raise ValueError(f"steps/batch_size: need steps >= 0 and batch_size > 0, got {steps}, {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PanoAutoencoder(config)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = _training_batches(images, batch_size, generator)
    for step in range(steps):
        x = next(batches)
        loss = F.l1_loss(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()


def reconstruction_error(model: PanoAutoencoder, images: torch.Tensor, batch_size: int = 16) -> float:
    """Mean L1 reconstruction error, in [-1, 1] units, of images uint8 or float in [0, 1]."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            x = float_images(chunk, "signed", layout="nchw")
            total += float(F.l1_loss(model(x), x, reduction="sum"))
            count += x.numel()
    return total / count


def autoencoder_features(model: PanoAutoencoder, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """FAED features (N, C * H/8) float64: the latent averaged over longitude, each row weighted by cos(latitude)."""
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            latent = model.encode(float_images(chunk, "signed", layout="nchw")).double()
            rows = latent.shape[-2]
            # Latitude of each latent row's centre (docs/geometry.md), so no row gets weight 0.
            lat = math.pi / 2 - math.pi * (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
            out.append((latent.mean(dim=-1) * lat.cos()).flatten(1))
    return torch.cat(out)


def faed(model: PanoAutoencoder, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 16) -> float:
    """FAED between real and generated panoramas (N, 3, H, W), uint8 or float in [0, 1]; at least 2 of each."""
    stats = []
    for images in (real, fake):
        acc = RunningStats()
        acc.update(autoencoder_features(model, images, batch_size))
        stats.append(acc.stats())
    return frechet_distance(*stats[0], *stats[1])


def save_autoencoder(model: PanoAutoencoder, directory: str) -> None:
    """Write the model to a directory (local or URI): config.json and model.safetensors."""
    config = {"kind": KIND, **asdict(model.config)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(directory, WEIGHTS_FILE), save_safetensors(state))
    storage.write_bytes(storage.join(directory, CONFIG_FILE), json.dumps(config, indent=2).encode())


def load_autoencoder(directory: str) -> PanoAutoencoder:
    """A model written by save_autoencoder, in eval mode."""
    config = json.loads(storage.read_bytes(storage.join(directory, CONFIG_FILE)))
    if config.pop("kind", None) != KIND:
        raise ValueError(f"{directory}: not a FAED autoencoder directory ({CONFIG_FILE} lacks kind={KIND!r})")
    config["channels"] = tuple(config["channels"])
    model = PanoAutoencoder(AutoencoderConfig(**config))
    model.load_state_dict(load_safetensors(storage.read_bytes(storage.join(directory, WEIGHTS_FILE))))
    return model.eval()
