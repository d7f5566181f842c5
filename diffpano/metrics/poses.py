"""Camera-pose recovery as a 3D consistency metric (the RotErr/TransErr protocol of camera-controlled generation):
the project's rig SfM (diffpano.data.captures.sfm) reconstructs a tour from its views alone, the recovered poses are
aligned to the requested ones by a similarity, and what is left is the error. Views that do not agree in 3D do not
register, or register where they were not asked to be."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffpano.metrics.images import channels_first

SFM_HEIGHT = 512  # panoramas are upsampled to this height first: SIFT finds too few features in 64-pixel rig views
SFM_PEAK_THRESHOLD = 0.001  # between the captures' 0.002 and noise: upsampled generated rooms are soft
MISSING_POSES = {"pose_registered": 0.0, "pose_rotation_error_deg": None, "pose_translation_error": None}


def project_rotation(m: np.ndarray) -> np.ndarray:
    """The rotation (3, 3) closest to m in the Frobenius norm."""
    u, _, vt = np.linalg.svd(m)
    return u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt


def align_similarity(estimated: np.ndarray, requested: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale s, rotation R (3, 3) and translation t (3,) taking estimated camera-to-world poses (F, 4, 4) onto the
    requested ones: R is the chordal mean of the per-view rotations R_req R_est^T (defined for straight walks, where
    the centres alone leave a rotation about the line free), then s and t are the least-squares fit of the centres."""
    rotation = project_rotation(sum(r @ e.T for r, e in zip(requested[:, :3, :3], estimated[:, :3, :3], strict=True)))
    est = estimated[:, :3, 3] @ rotation.T
    req = requested[:, :3, 3]
    de, dr = est - est.mean(0), req - req.mean(0)
    spread = float((de * de).sum())
    scale = float((de * dr).sum()) / spread if spread > 1e-12 else 1.0
    return scale, rotation, req.mean(0) - scale * est.mean(0)


def pose_errors(estimated: np.ndarray, requested: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per view: rotation error in degrees and centre distance (requested units) after align_similarity."""
    scale, rotation, shift = align_similarity(estimated, requested)
    turned = rotation @ estimated[:, :3, :3]
    cos = (np.einsum("nij,nij->n", turned, requested[:, :3, :3]) - 1) / 2
    centres = scale * estimated[:, :3, 3] @ rotation.T + shift
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))), np.linalg.norm(centres - requested[:, :3, 3], axis=1)


def path_length(poses: np.ndarray) -> float:
    """Length of the path through the camera centres (F, 4, 4), in order."""
    return float(np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1).sum())


def sfm_panoramas(images: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Panoramas (H, W, 3) uint8 of uint8 images (N, H, W, 3) or (N, 3, H, W), upsampled (bicubic) to at least
    SFM_HEIGHT rows for the rig SfM."""
    x = channels_first(images)
    if x.shape[-2] < SFM_HEIGHT:
        x = F.interpolate(x.float(), size=(SFM_HEIGHT, 2 * SFM_HEIGHT), mode="bicubic", align_corners=False)
    return list(x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy())


@contextmanager
def quiet_colmap() -> Iterator[None]:
    """COLMAP's log limited to fatal messages: a tour that does not reconstruct is this metric's finding (reported in
    its numbers), not an error to print."""
    import pycolmap

    level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = int(pycolmap.logging.FATAL)
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = level


def pose_recovery(images: np.ndarray | torch.Tensor, poses: np.ndarray, threads: int = 1, seed: int = 0) -> dict:
    """Share of a tour's uint8 views (N, H, W, 3) or (N, 3, H, W) the rig SfM registers in its largest model, and
    the mean rotation error (degrees) and centre error (a fraction of the requested path's length) of those views
    against the requested camera-to-world poses (N, 4, 4); errors are None when fewer than three views register (or
    the path is a point)."""
    from diffpano.data.captures.sfm import reconstruct

    poses = np.asarray(poses, dtype=np.float64)
    try:
        with quiet_colmap(), tempfile.TemporaryDirectory(prefix="diffpano-poses-") as work:
            models = reconstruct(sfm_panoramas(images), Path(work), threads=threads, seed=seed,
                                 peak_threshold=SFM_PEAK_THRESHOLD)
    except ValueError:  # too plain, or nothing registered: the tour gives SfM nothing to agree on
        return dict(MISSING_POSES)
    model = models[0]
    rotation, distance = pose_errors(model.poses, poses[model.frames])
    length = path_length(poses)
    return {"pose_registered": len(model.frames) / len(poses),
            "pose_rotation_error_deg": float(rotation.mean()),
            "pose_translation_error": float(distance.mean()) / length if length > 1e-9 else None}

