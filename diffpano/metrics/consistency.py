"""Multi-view consistency of a tour: along spherical epipolar arcs (no depth), and by reprojection with depth."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from diffpano.geometry.reprojection import warp
from diffpano.geometry.spherical import circular_grid_sample, epipolar_samples, nearest_views
from diffpano.metrics.images import float_images, resize

EVAL_SIZE = (64, 128)
NULL_EPS = 1e-4  # below this the images have no texture to match: no evidence of consistency


def epipolar_error(
    targets: torch.Tensor, references: torch.Tensor, poses: torch.Tensor, num_samples: int = 64,
    near: float = 0.3, far: float = 15.0, size: tuple[int, int] = EVAL_SIZE,
) -> float:
    """Mean over target pixels of the best colour match (L1, [0, 1]) among S points of its arc in its nearest view.

    targets and references are (N, 3, H, W) in [0, 1]; view t is compared with references[nearest(t)], so passing
    unrelated images as references measures the same number for views that share no scene.
    """
    poses = torch.as_tensor(np.asarray(poses), dtype=torch.float32)
    n = poses.shape[0]
    if n < 2 or targets.shape[0] != n or references.shape[0] != n:
        raise ValueError(f"poses: need N >= 2 views with one pose and one image each, got {n} poses, "
                         f"{targets.shape[0]} targets, {references.shape[0]} references")
    h, w = size
    # Area averaging is a low-pass, so sampling the arcs does not alias.
    tgt, ref = resize(targets, size), resize(references, size)
    idx, valid = nearest_views(poses, 1)
    samples = epipolar_samples(poses, idx, valid, h, w, num_samples, near, far)
    grid = samples.grid[:, 0]  # (N, hw, S, 2)
    picked = circular_grid_sample(ref[idx[:, 0]], grid)  # (N, 3, hw, S)
    diff = (picked - tgt.flatten(2).unsqueeze(-1)).abs().mean(1)  # (N, hw, S)
    diff = torch.where(samples.mask[:, 0], diff, torch.full_like(diff, math.inf))
    best = diff.min(-1).values
    return float(best[torch.isfinite(best)].mean())


def neighbours_and_unrelated(tours: Sequence, poses: Sequence) -> tuple[float, float]:
    """Mean epipolar error of each tour's neighbouring views, and the same with the next tour's views read as if they
    stood at this tour's poses (unrelated: another scene); tours (N, H, W, 3) or (N, 3, H, W), poses (N, 4, 4) each."""
    own, unrelated = [], []
    for i, (images, p) in enumerate(zip(tours, poses, strict=True)):
        x = float_images(images)
        own.append(epipolar_error(x, x, p))
        unrelated.append(epipolar_error(x, float_images(tours[(i + 1) % len(tours)]), p))
    return float(np.mean(own)), float(np.mean(unrelated))


def loop_closure(images: np.ndarray | torch.Tensor, poses: np.ndarray | torch.Tensor) -> dict:
    """A closed loop's closing-pair epipolar error (last -> first view), the mean of its neighbouring pairs', their
    ratio, and the same ratio averaged over every pair (`control`).

    The control reads the ratio: a pair no different from its neighbours scores about 1 (a little above, since one
    pair varies more than a mean of many).
    """
    x = float_images(images)
    poses = torch.as_tensor(np.asarray(poses), dtype=torch.float32)
    n = x.shape[0]
    errors = [epipolar_error(x[[i, (i + 1) % n]], x[[i, (i + 1) % n]], poses[[i, (i + 1) % n]]) for i in range(n)]
    ratio = lambda i: errors[i] / statistics.mean(errors[:i] + errors[i + 1 :])  # noqa: E731
    return {"closing": errors[-1], "neighbours": statistics.mean(errors[:-1]), "ratio": ratio(n - 1),
            "control": statistics.mean(ratio(i) for i in range(n))}


def epipolar_consistency(images, poses, num_samples: int = 64, size: tuple[int, int] = EVAL_SIZE,
                         unrelated=None) -> dict:
    """Epipolar error of a tour, the same error against a null (references rolled by half a turn), and the score.

    score = 1 - error / error_null: near 1 when colours agree along the arcs, near 0 for views that do not show
    one scene, and 0 (no evidence) for textureless images whose null error vanishes. With `unrelated` images
    (views of other scenes at the same positions) their error is reported too.
    """
    x = float_images(images)
    err = epipolar_error(x, x, poses, num_samples, size=size)
    err_null = epipolar_error(x, torch.roll(x, x.shape[-1] // 2, dims=-1), poses, num_samples, size=size)
    out = {"epipolar_error": err, "epipolar_error_null": err_null,
           "epipolar_score": 0.0 if err_null < NULL_EPS else max(0.0, 1.0 - err / err_null)}
    if unrelated is not None:
        out["epipolar_error_unrelated"] = epipolar_error(x, float_images(unrelated), poses, num_samples, size=size)
    return out


def _masked_psnr_ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of (3, H, W) images in [0, 1] over mask pixels (SSIM map averaged over the mask)."""
    mse = float(((a - b) ** 2).mean(0)[mask].mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    filled = torch.where(mask, b, a)  # outside the mask the SSIM window sees the image itself, not a hole
    _, ssim_map = structural_similarity_index_measure(
        filled[None], a[None], data_range=1.0, return_full_image=True
    )
    return psnr, float(ssim_map[0].mean(0)[mask].mean())


def reprojection_scores(images, depths: np.ndarray, poses: np.ndarray, min_overlap: float = 0.05) -> dict:
    """PSNR/SSIM between neighbouring views over pixels that ground-truth depth maps onto each other, unoccluded.

    images (N, ...) are the views to score; depths (N, H, W) metres and poses (N, 4, 4) are the ground truth.
    Pairs (i, i+1) both ways; PSNR of identical overlaps is infinite and is capped at 100 dB for the mean.
    """
    x = float_images(images)
    depths, poses = np.asarray(depths, np.float32), np.asarray(poses, np.float64)
    x = resize(x, depths.shape[-2:])
    psnrs, ssims = [], []
    for i in range(len(x) - 1):
        for s, t in ((i, i + 1), (i + 1, i)):
            moved = warp(depths[s], poses[s], poses[t], depths[t])
            mask = torch.from_numpy(moved.visible)
            if mask.float().mean() < min_overlap:
                continue
            sampled = x[t][:, torch.from_numpy(moved.v), torch.from_numpy(moved.u)]
            p, q = _masked_psnr_ssim(x[s], sampled, mask)
            psnrs.append(min(p, 100.0))
            ssims.append(q)
    if not psnrs:
        return {"reprojection_psnr": None, "reprojection_ssim": None, "reprojection_pairs": 0}
    return {"reprojection_psnr": float(np.mean(psnrs)), "reprojection_ssim": float(np.mean(ssims)),
            "reprojection_pairs": len(psnrs)}


def normalised_reprojection(generated, ground_truth, depths, poses) -> dict:
    """Reprojection PSNR/SSIM of generated views and their ratio to the same scores of the ground-truth views."""
    gen = reprojection_scores(generated, depths, poses)
    ref = reprojection_scores(ground_truth, depths, poses)
    out = dict(gen)
    out["reprojection_psnr_gt"], out["reprojection_ssim_gt"] = ref["reprojection_psnr"], ref["reprojection_ssim"]
    for key in ("psnr", "ssim"):
        a, b = gen[f"reprojection_{key}"], ref[f"reprojection_{key}"]
        out[f"reprojection_{key}_ratio"] = None if a is None or not b else a / b
    return out
