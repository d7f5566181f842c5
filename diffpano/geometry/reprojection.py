"""Moving panorama pixels between views with depth and poses (docs/geometry.md): warps and their visibility."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffpano.geometry.spherical import direction_grid, direction_to_pixel


@dataclass
class Warp:
    """Where each pixel of a source view lands in a target view: pixel (u, v), its range there, and visibility."""

    u: np.ndarray
    v: np.ndarray
    distance: np.ndarray
    visible: np.ndarray


def warp(depth_src: np.ndarray, pose_src: np.ndarray, pose_dst: np.ndarray, depth_dst: np.ndarray,
         rel_tol: float = 0.03, abs_tol: float = 0.02) -> Warp:
    """Nearest target pixel of every source pixel, visible where the target's depth there agrees (not occluded)."""
    h, w = depth_src.shape
    dirs = direction_grid(h, w, dtype=torch.float64).numpy()
    pose_src, pose_dst = np.asarray(pose_src, np.float64), np.asarray(pose_dst, np.float64)
    world = pose_src[:3, 3] + (dirs @ pose_src[:3, :3].T) * np.asarray(depth_src, np.float64)[..., None]
    local = (world - pose_dst[:3, 3]) @ pose_dst[:3, :3]  # R^T (X - C), row-vector form
    distance = np.linalg.norm(local, axis=-1)
    uf, vf = direction_to_pixel(torch.from_numpy(local), h, w)
    u = np.floor(uf.numpy() + 0.5).astype(np.int64) % w
    v = np.clip(np.floor(vf.numpy() + 0.5).astype(np.int64), 0, h - 1)
    known = (depth_src > 0) & (depth_dst[v, u] > 0)
    visible = known & (np.abs(depth_dst[v, u] - distance) < rel_tol * distance + abs_tol)
    return Warp(u, v, distance, visible)


def colour_agreement(rgb_src: np.ndarray, rgb_dst: np.ndarray, moved: Warp, tol: int = 24) -> float:
    """Share of visible source pixels whose colour in the target differs by at most tol (0-255) per channel."""
    if not moved.visible.any():
        return 0.0
    diff = np.abs(rgb_src.astype(np.int16) - rgb_dst[moved.v, moved.u].astype(np.int16)).max(-1)
    return float((diff[moved.visible] <= tol).mean())
