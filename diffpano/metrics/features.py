"""Injectable image feature extractors (FID/IS) and text-image scorers (CLIP score), real weights or small stand-ins."""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffpano.metrics.images import float_images, resize

INCEPTION_SIZE = 299
_SCORER_CONV_DIM = 32
MISSING: dict[str, str] = {
    "inception": "FID/IS/OmniFID need an Inception TorchScript file: pass --inception PATH "
    "(inception-2015-12-05.pt from clean-fid/StyleGAN3)",
    "clip": "CLIP score needs a local CLIP directory: pass --clip DIR "
    "(e.g. openai/clip-vit-base-patch16 saved with save_pretrained)",
    "lpips_weights": "LPIPS needs local backbone weights: pass --lpips-weights PATH (a torchvision state_dict such as "
    "alexnet-owt-7be5be79.pth for net 'alex'); nothing is downloaded",
}


class MissingWeights(ValueError):
    """A metric cannot run because weights (or a package) it needs are not available locally."""

    @classmethod
    def of(cls, kind: str, detail: str = "") -> MissingWeights:
        """The exception for one of the MISSING kinds, with an optional detail (such as the path that was tried)."""
        return cls(MISSING[kind] + (f" ({detail})" if detail else ""))


@runtime_checkable
class FeatureExtractor(Protocol):
    """Image features for FID and class probabilities for IS."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, D) float64 of uint8 images (N, 3, H, W)."""
        ...

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) float64 of uint8 images (N, 3, H, W); rows sum to 1."""
        ...


@runtime_checkable
class TextImageScorer(Protocol):
    """Agreement of images with texts."""

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Scores (N,) float64 in [0, 100] of uint8 images (N, 3, H, W) against N texts."""
        ...


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise ValueError unless images is a uint8 tensor of shape (N, 3, H, W)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a tensor of shape (N, 3, H, W), got {got}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{name}: expected uint8 images, got {images.dtype}")


class TorchScriptInception:
    """FID/IS Inception-v3 from a TorchScript file (clean-fid / StyleGAN3 `inception-2015-12-05.pt` convention)."""

    def __init__(self, path: str | os.PathLike | None, device: str | torch.device = "cpu", batch_size: int = 32):
        if not path or not os.path.isfile(path):
            raise MissingWeights.of("inception", f"{path} is not a file" if path else "no path given")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    def _run(self, images: torch.Tensor, return_features: bool) -> torch.Tensor:
        """The model's output for images resized to 299 x 299 uint8, batch by batch, as float64 on the CPU."""
        check_images(images)
        out = []
        for chunk in images.split(self.batch_size):
            x = resize(chunk.to(self.device, torch.float32), (INCEPTION_SIZE, INCEPTION_SIZE), "bilinear")
            x = x.round().clamp(0, 255).to(torch.uint8)
            with torch.inference_mode():
                y = self.model(x, return_features=True) if return_features else self.model(x)
            out.append(y.to("cpu", torch.float64))
        return torch.cat(out)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """2048-d pool features (N, 2048) of uint8 images (N, 3, H, W)."""
        return self._run(images, return_features=True)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 1008) of uint8 images (N, 3, H, W)."""
        return self._run(images, return_features=False)


class ClipScorer:
    """CLIP score (torchmetrics' definition) with a local transformers CLIP directory."""

    def __init__(self, model_dir: str | os.PathLike | None, device: str | torch.device = "cpu", batch_size: int = 32):
        if not model_dir or not os.path.isdir(model_dir):
            raise MissingWeights.of("clip", f"{model_dir} is not a directory" if model_dir else "no directory given")
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(self.device)
        self.processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """100 * max(cosine(image embedding, text embedding), 0) per pair, (N,) float64."""
        check_images(images)
        texts = _check_texts(texts, images.shape[0])
        out = []
        for i in range(0, len(texts), self.batch_size):
            inputs = self.processor(
                text=texts[i : i + self.batch_size], images=list(images[i : i + self.batch_size]),
                return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                result = self.model(**inputs)
            out.append(_cosine_score(result.image_embeds, result.text_embeds))
        return torch.cat(out)


def _check_texts(texts: Sequence[str], count: int) -> list[str]:
    """texts as a list, or raise ValueError unless there is one string per image."""
    if isinstance(texts, str) or len(texts) != count or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"texts: expected {count} strings, one per image, got {texts!r:.200}")
    return list(texts)


def _cosine_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """100 * max(cosine, 0) of paired embeddings (N, D), float64 on the CPU."""
    cos = (F.normalize(image_emb.double(), dim=-1) * F.normalize(text_emb.double(), dim=-1)).sum(-1)
    return (100 * cos).clamp(min=0).cpu()


class _ConvTrunk(nn.Module):
    """Three strided 3x3 convolutions and a global average pool: (N, 3, s, s) in [-1, 1] -> (N, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, dim)."""
        return self.net(x)


def _seeded(seed: int, build):
    """build() run with torch's global RNG seeded by seed, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class SmallFeatureNet:
    """A small random (fixed-seed) conv net standing in for Inception in tests and when no weights are available."""

    def __init__(self, seed: int = 0, dim: int = 64, classes: int = 16, input_size: int = 64, batch_size: int = 64):
        self.input_size = input_size
        self.batch_size = batch_size
        self.trunk: _ConvTrunk = _seeded(seed, lambda: _ConvTrunk(dim).eval())
        self.head: nn.Linear = _seeded(seed + 1, lambda: nn.Linear(dim, classes).eval())

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as float in [-1, 1] at the net's square input size."""
        size = (self.input_size, self.input_size)
        return float_images(images, "signed", layout="nchw", size=size, resize_mode="bilinear")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, dim) float64 of uint8 images (N, 3, H, W)."""
        check_images(images)
        with torch.inference_mode():
            out = [self.trunk(self._prepare(c)) for c in images.split(self.batch_size)]
        return torch.cat(out).double()

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of a random linear head on the features, (N, classes) float64."""
        feats = self.features(images)
        with torch.inference_mode():
            return torch.softmax(self.head(feats.float()).double(), dim=-1)


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words of a text."""
    return re.findall(r"[a-z0-9]+", text.lower())


class SmallTextImageScorer:
    """A small CLIP stand-in: hashed bag-of-words text embeddings and a random conv image embedding.

    Untrained, scores are deterministic but meaningless; `fit` solves the image projection by ridge regression on
    (image, text) pairs, after which matching pairs of similar data score higher than mismatched ones.
    """

    def __init__(self, seed: int = 0, dim: int = 32, input_size: int = 32):
        self.seed = seed
        self.dim = dim
        self.net = SmallFeatureNet(seed, dim=_SCORER_CONV_DIM, classes=2, input_size=input_size)
        rng = np.random.default_rng([seed, 1])
        self.projection = torch.from_numpy(rng.standard_normal((_SCORER_CONV_DIM + 6, dim)))

    def word_vector(self, word: str) -> torch.Tensor:
        """A fixed random unit vector (dim,) per word, from the seed and the word's CRC32 (not Python's salted hash)."""
        v = np.random.default_rng([self.seed, zlib.crc32(word.encode())]).standard_normal(self.dim)
        return torch.from_numpy(v / np.linalg.norm(v))

    def text_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """Sum of the word vectors of each text, (N, dim) float64; zero for a text without words."""
        rows = [sum((self.word_vector(w) for w in words(t)), torch.zeros(self.dim, dtype=torch.float64)) for t in texts]
        return torch.stack(rows)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Conv features plus per-channel mean and std of uint8 images, (N, conv dim + 6) float64."""
        check_images(images)
        x = float_images(images, dtype=torch.float64, layout="nchw")
        stats = torch.cat((x.mean(dim=(2, 3)), x.std(dim=(2, 3))), dim=1)
        return torch.cat((self.net.features(images), stats), dim=1)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (N, dim) float64 in the text embedding space."""
        return self.image_features(images) @ self.projection

    def fit(self, images: torch.Tensor, texts: Sequence[str], ridge: float = 1e-3) -> SmallTextImageScorer:
        """Set the image projection to the ridge regression of the texts' embeddings on the images' features."""
        texts = _check_texts(texts, images.shape[0])
        x = self.image_features(images)
        y = torch.nn.functional.normalize(self.text_embedding(texts), dim=-1)
        gram = x.T @ x + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype)
        self.projection = torch.linalg.solve(gram, x.T @ y)
        return self

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """100 * max(cosine(image embedding, text embedding), 0) per pair, (N,) float64."""
        texts = _check_texts(texts, images.shape[0])
        return _cosine_score(self.image_embedding(images), self.text_embedding(texts))
