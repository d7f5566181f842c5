"""A reconstruction put into the project's world (docs/geometry.md): gravity along +y, metres, the floor at y = 0
under the first keyframe's camera, which looks along +z.

Gravity: 360-degree cameras level their panoramas (an IMU's horizon correction: Insta360 FlowState, Ricoh Theta's
zenith correction), so each keyframe's image-down axis (camera +y) points along gravity. Gravity is the normalised
mean of those axes in the reconstruction; a capture whose axes disagree by a median of more than GRAVITY_SPREAD_DEG
is not levelled and is refused.

Scale: the floor is the lowest large horizontal level of the sparse points below the cameras (a histogram of their
heights along gravity), and metres per reconstruction unit = camera height / the cameras' median height above it,
unless an explicit scale is given.
"""

from __future__ import annotations

import math

import numpy as np

GRAVITY_SPREAD_DEG = 5.0
FLOOR_BINS = 100  # the heights below the cameras are histogrammed in 1/100ths of their range
MIN_FLOOR_SHARE = 0.25  # a level holds at least this share of the fullest level's points (walls spread thinly)
MIN_FLOOR_POINTS = 30


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles in degrees between unit vectors (..., 3)."""
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def gravity_rotation(poses: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) taking the reconstruction to a world with gravity along +y and the first camera looking
    along +z; ValueError when the keyframes are not levelled."""
    downs = poses[:, :3, 1]  # camera +y of each keyframe in the reconstruction
    g = downs.mean(0)
    g /= np.linalg.norm(g)
    spread = float(np.median(angle_deg(downs, g)))
    if spread > GRAVITY_SPREAD_DEG:
        raise ValueError(f"gravity: the keyframes' image-down axes disagree by a median of {spread:.1f} degrees "
                         f"(at most {GRAVITY_SPREAD_DEG:.0f}); the panoramas are not levelled: export them with the "
                         "camera's horizon levelling on")
    forward = poses[0, :3, 2] - g * (poses[0, :3, 2] @ g)
    forward /= np.linalg.norm(forward)
    return np.stack([np.cross(g, forward), g, forward])  # rows: the world's x, y and z in the reconstruction


def floor_depth(points_y: np.ndarray, cameras_y: np.ndarray) -> float:
    """How far (reconstruction units) the floor lies below the cameras' median height, y along gravity;
    ValueError when too few points lie below the cameras."""
    below = points_y - float(np.median(cameras_y))
    below = below[below > 0]
    if len(below) < MIN_FLOOR_POINTS:
        raise ValueError(f"scale: only {len(below)} reconstructed points lie below the cameras, too few to find "
                         "the floor; pass --scale (metres per reconstruction unit)")
    top = float(np.quantile(below, 0.99))
    counts, edges = np.histogram(below, bins=FLOOR_BINS, range=(0.0, top))
    large = np.flatnonzero(counts >= MIN_FLOOR_SHARE * counts.max())
    k = int(large.max())  # the lowest large level
    near = below[(below >= edges[max(k - 1, 0)]) & (below <= edges[min(k + 2, FLOOR_BINS)])]
    return float(np.median(near))


def metric_poses(poses: np.ndarray, points: np.ndarray, camera_height: float,
                 scale: float | None = None) -> tuple[np.ndarray, float]:
    """Camera-to-world poses (F, 4, 4) in the project's world and the metres per reconstruction unit used."""
    rotation = gravity_rotation(poses)
    centres = poses[:, :3, 3] @ rotation.T
    cams_y = centres[:, 1]
    try:
        depth = floor_depth(points @ rotation.T[:, 1], cams_y)
    except ValueError:
        if scale is None:
            raise
        depth = camera_height / scale  # no floor found: put it camera_height below the cameras
    if scale is None:
        scale = camera_height / depth
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: got {scale} metres per reconstruction unit")
    origin = np.array([centres[0, 0], float(np.median(cams_y)) + depth, centres[0, 2]])
    out = np.tile(np.eye(4), (len(poses), 1, 1))
    out[:, :3, :3] = rotation @ poses[:, :3, :3]
    out[:, :3, 3] = scale * (centres - origin)
    return out, float(scale)
