"""Distribution metrics of generated panoramas: FID, IS and CLIP score on PanFusion's view families."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy import linalg
from scipy.special import rel_entr

from diffpano.metrics.features import MISSING, FeatureExtractor, TextImageScorer
from diffpano.metrics.images import to_uint8
from diffpano.metrics.views import (
    ALL_FAMILIES,
    CROP_SIZE,
    FACE_GROUPS,
    VIEW_FAMILIES,
    check_panoramas,
    view_images,
    views_per_panorama,
)

CLIP_FAMILIES = ("full", "horizontal")
ArrayLike = np.ndarray | torch.Tensor
Images = torch.Tensor | Iterable[torch.Tensor]


def _as_array(x: ArrayLike, ndim: int) -> np.ndarray:
    """x as a float64 numpy array with at least ndim dimensions."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    return np.atleast_2d(a) if ndim == 2 else np.atleast_1d(a)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians.

    sqrt(S1 S2) is scipy's sqrtm; when it is not finite or has a noticeable imaginary diagonal (near-singular
    covariances, e.g. fewer samples than dimensions) it is recomputed with eps added to both diagonals, and its real
    part is used.
    """
    mu1, mu2 = _as_array(mu1, 1), _as_array(mu2, 1)
    s1, s2 = _as_array(sigma1, 2), _as_array(sigma2, 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes disagree: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about singular products; the check below handles them
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all() or not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2."""
    f = _as_array(features, 2)
    if f.shape[0] < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


class RunningStats:
    """Mean and covariance of features that arrive batch by batch, without keeping them."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: ArrayLike) -> None:
        """Add a batch of features (n, D)."""
        f = _as_array(features, 2)
        if self.shift is None:
            # Sums about the first batch's mean, so that a large mean costs the covariance no precision.
            self.shift = f.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        x = f - self.shift
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        self.count += f.shape[0]

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D) of everything added, at least 2 samples."""
        if self.count < 2:
            raise ValueError(f"features: need at least 2 samples for a covariance, got {self.count}")
        m = self.total / self.count
        sigma = (self.outer - self.count * np.outer(m, m)) / (self.count - 1)
        return self.shift + m, sigma


def fid(real_features: ArrayLike, fake_features: ArrayLike) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_stats(real_features), *feature_stats(fake_features))


def inception_score(probabilities: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception score: mean and std over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's marginal.

    As torchmetrics (PanFusion's implementation) but without its random shuffle: splits are consecutive, at most N of
    them, and the std is unbiased (0 for a single split).
    """
    p = _as_array(probabilities, 2)
    if p.shape[0] < 1:
        raise ValueError("probabilities: need at least one sample")
    scores = []
    for part in np.array_split(p, min(splits, p.shape[0])):
        marginal = part.mean(axis=0, keepdims=True)
        scores.append(np.exp(rel_entr(part, marginal).sum(axis=1).mean()))
    scores = np.array(scores)
    return float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0


def clip_score(scorer: TextImageScorer, images: torch.Tensor, texts: Sequence[str], batch_size: int = 64) -> float:
    """Mean CLIP score of images (N, 3, H, W) against their N texts."""
    images = to_uint8(images)
    if len(texts) != images.shape[0]:
        raise ValueError(f"texts: expected {images.shape[0]} texts, one per image, got {len(texts)}")
    scores = [
        scorer.score(images[i : i + batch_size], list(texts[i : i + batch_size]))
        for i in range(0, images.shape[0], batch_size)
    ]
    return float(torch.cat(scores).double().mean())


def _batches(images: Images, batch_size: int, name: str) -> Iterator[torch.Tensor]:
    """uint8 panorama batches (b, 3, H, W) of a tensor or of an iterable of batches."""
    source = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    for batch in source:
        batch = to_uint8(batch if batch.ndim == 4 else batch.unsqueeze(0))
        check_panoramas(batch, name)
        yield batch


class _Family:
    """What is accumulated for one view family of one image set."""

    def __init__(self) -> None:
        self.stats = RunningStats()
        self.probabilities: list[torch.Tensor] = []
        self.clip: list[torch.Tensor] = []


def _accumulate(
    images: Images, families: Sequence[str], extractor: FeatureExtractor | None, scorer: TextImageScorer | None,
    prompts: Sequence[str] | None, options: dict, name: str, want_probabilities: bool,
) -> tuple[dict[str, _Family], int]:
    """Features (and probabilities, CLIP scores) of every view family of an image set, and its panorama count."""
    acc = {f: _Family() for f in families}
    count = 0
    for batch in _batches(images, options["batch_size"], name):
        b = batch.shape[0]
        if prompts is not None and count + b > len(prompts):
            raise ValueError(f"prompts: {len(prompts)} prompts for more {name} panoramas")
        for family in families:
            if extractor is None and (scorer is None or family not in CLIP_FAMILIES):
                continue
            views = view_images(
                batch, family, options["crops"], options["horizontal"], options["crop_size"], options["seed"], count
            )
            if extractor is not None:
                acc[family].stats.update(extractor.features(views))
                if want_probabilities:
                    acc[family].probabilities.append(extractor.probabilities(views).double())
            if scorer is not None and family in CLIP_FAMILIES:
                per = views_per_panorama(family, options["crops"], options["horizontal"])
                texts = [t for t in prompts[count : count + b] for _ in range(per)]
                acc[family].clip.append(scorer.score(views, texts).double())
        count += b
    if prompts is not None and count != len(prompts):
        raise ValueError(f"prompts: expected one prompt per {name} panorama ({count}), got {len(prompts)}")
    return acc, count


def distribution_metrics(
    real: Images | None,
    fake: Images,
    prompts: Sequence[str] | None,
    extractor: FeatureExtractor | None,
    scorer: TextImageScorer | None,
    views: Sequence[str] = VIEW_FAMILIES,
    crops: int = 20,
    horizontal: int = 8,
    crop_size: int = CROP_SIZE,
    seed: int = 0,
    is_splits: int = 10,
    batch_size: int = 8,
) -> dict:
    """FID/IS per view family and CLIP score on full panoramas and horizontal crops (PanFusion's protocol).

    real/fake: panoramas (N, 3, H, W) uint8 (or float in [0, 1]), or iterables of such batches; prompts: one per fake
    panorama, repeated for each of its crops. Keys: fid_<family> (needs real), is_<family>, is_<family>_std,
    clip_full, clip_horizontal, n_real, n_fake, and `missing`: a list of MissingWeights messages for the metrics left
    out because extractor or scorer is None (those keys are absent, never zero).
    """
    unknown = [v for v in views if v not in ALL_FAMILIES]
    if unknown or not views:
        raise ValueError(f"views: expected a non-empty subset of {', '.join(ALL_FAMILIES)}, got {list(views)}")
    clip_families = [f for f in views if f in CLIP_FAMILIES]
    if scorer is not None and clip_families and prompts is None:
        raise ValueError("prompts: CLIP score needs one prompt per generated panorama")
    missing = []
    if extractor is None:
        missing.append(MISSING["inception"])
    if scorer is None and clip_families:
        missing.append(MISSING["clip"])
        prompts = None
    options = dict(batch_size=batch_size, crops=crops, horizontal=horizontal, crop_size=crop_size, seed=seed)
    result: dict = {}
    fake_acc, result["n_fake"] = _accumulate(fake, views, extractor, scorer, prompts, options, "fake", True)
    if real is not None and extractor is not None:
        real_acc, result["n_real"] = _accumulate(real, views, extractor, None, None, options, "real", False)
    for family in views:
        if extractor is not None:
            if real is not None:
                result[f"fid_{family}"] = frechet_distance(
                    *real_acc[family].stats.stats(), *fake_acc[family].stats.stats()
                )
            result[f"is_{family}"], result[f"is_{family}_std"] = inception_score(
                torch.cat(fake_acc[family].probabilities), is_splits
            )
        if scorer is not None and family in CLIP_FAMILIES:
            result[f"clip_{family}"] = float(torch.cat(fake_acc[family].clip).mean())
    result["missing"] = missing
    return result


def omnifid(real: Images, fake: Images, extractor: FeatureExtractor, batch_size: int = 8) -> dict:
    """OmniFID's terms: FID on the up faces, the down faces and the four side faces pooled (each against the same
    faces of the real set), and `omnifid`, their mean (Christensen et al., ECCV 2024)."""
    found = distribution_metrics(real, fake, None, extractor, None, views=tuple(FACE_GROUPS), batch_size=batch_size)
    terms = {f"omnifid_{g}": found[f"fid_{g}"] for g in FACE_GROUPS}
    return {**terms, "omnifid": float(np.mean(list(terms.values())))}
