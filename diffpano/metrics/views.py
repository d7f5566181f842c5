"""PanFusion's evaluation views of panoramas: the full image, the seam rolled to the centre, perspective crops."""

from __future__ import annotations

import numpy as np
import torch

from diffpano.geometry.projection import CUBE_FACES, equirect_to_cubemap, equirect_to_perspective
from diffpano.geometry.spherical import check_panorama_size

CROP_FOV = 90.0
CROP_SIZE = 299  # Inception's input size: crops made at this size are not resampled again by FID/IS
VIEW_FAMILIES = ("full", "rolled", "crops", "horizontal")
# OmniFID's cube-face groups (Christensen et al., ECCV 2024): the up face, the down face, the four sides pooled.
FACE_GROUPS = {"up": ("up",), "down": ("down",), "sides": ("front", "right", "back", "left")}
ALL_FAMILIES = (*VIEW_FAMILIES, *FACE_GROUPS)


def check_panoramas(p: torch.Tensor, name: str = "panoramas") -> None:
    """Raise ValueError unless p is a (B, 3, H, W) uint8 or float tensor with W = 2H."""
    if not isinstance(p, torch.Tensor) or p.ndim != 4 or p.shape[1] != 3:
        got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"{name}: expected a tensor of shape (B, 3, H, W), got {got}")
    if p.dtype != torch.uint8 and not p.is_floating_point():
        raise ValueError(f"{name}: expected uint8 or floating-point values, got {p.dtype}")
    check_panorama_size(p.shape[-2], p.shape[-1], field=name)


def _restore(views: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sampled float views back in the input's dtype (uint8 rounded and clamped)."""
    if dtype == torch.uint8:
        return views.round().clamp(0, 255).to(torch.uint8)
    return views.to(dtype)


def _crops(p: torch.Tensor, yaws: torch.Tensor, pitches: torch.Tensor, size: int) -> torch.Tensor:
    """90-degree crops (B*n, 3, size, size) of each panorama at its own (B, n) angles, panorama-major."""
    work = torch.float64 if p.dtype == torch.float64 else torch.float32
    out = [
        equirect_to_perspective(pano.to(work), CROP_FOV, yaw, pitch, size, size)
        for pano, yaw, pitch in zip(p, yaws, pitches, strict=True)
    ]
    return _restore(torch.cat(out), p.dtype)


def full(p: torch.Tensor) -> torch.Tensor:
    """The panoramas themselves."""
    check_panoramas(p)
    return p


def rolled(p: torch.Tensor) -> torch.Tensor:
    """The panoramas rolled by W/2 in longitude, so that the seam lies in the middle of the image."""
    check_panoramas(p)
    return torch.roll(p, shifts=p.shape[-1] // 2, dims=-1)


def random_directions(count: int, n: int, seed: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw, pitch) in degrees, each (count, n), uniform on the sphere, for panoramas start .. start+count-1.

    Panorama i's directions depend only on (seed, i), so crops do not change with how a set is split in batches.
    """
    yaw, pitch = np.empty((count, n)), np.empty((count, n))
    for row in range(count):
        rng = np.random.default_rng([seed, start + row])
        yaw[row] = rng.uniform(-180.0, 180.0, size=n)
        pitch[row] = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, size=n)))
    return torch.from_numpy(yaw), torch.from_numpy(pitch)


def random_crops(p: torch.Tensor, n: int = 20, size: int = CROP_SIZE, seed: int = 0, start: int = 0) -> torch.Tensor:
    """n random 90-degree perspective crops (B*n, 3, size, size) per panorama, directions uniform on the sphere.

    `start` is the index of p[0] in the whole set (see random_directions).
    """
    check_panoramas(p)
    if n <= 0:
        raise ValueError(f"n: must be a positive number of crops, got {n}")
    yaw, pitch = random_directions(p.shape[0], n, seed, start)
    return _crops(p, yaw, pitch, size)


def horizontal_yaws(n: int = 8) -> list[float]:
    """Yaws in degrees of n evenly spaced horizontal views from yaw 0 (45-degree steps for n = 8)."""
    return [360.0 * k / n for k in range(n)]


def horizontal_crops(p: torch.Tensor, n: int = 8, size: int = CROP_SIZE) -> torch.Tensor:
    """n horizontal 90-degree crops (B*n, 3, size, size) per panorama at yaws 0, 360/n, ... (MVDiffusion's views)."""
    check_panoramas(p)
    if n <= 0:
        raise ValueError(f"n: must be a positive number of crops, got {n}")
    yaw = torch.tensor(horizontal_yaws(n), dtype=torch.float64).expand(p.shape[0], n)
    return _crops(p, yaw, torch.zeros_like(yaw), size)


def cube_faces(p: torch.Tensor, group: str, size: int = CROP_SIZE) -> torch.Tensor:
    """The cube faces of one of FACE_GROUPS (B*n, 3, size, size) of each panorama, panorama-major."""
    check_panoramas(p)
    if group not in FACE_GROUPS:
        raise ValueError(f"group: expected one of {', '.join(FACE_GROUPS)}, got {group!r}")
    work = torch.float64 if p.dtype == torch.float64 else torch.float32
    faces = equirect_to_cubemap(p.to(work), size)[:, [CUBE_FACES.index(f) for f in FACE_GROUPS[group]]]
    return _restore(faces.flatten(0, 1), p.dtype)


def view_images(
    p: torch.Tensor, family: str, crops: int = 20, horizontal: int = 8, size: int = CROP_SIZE, seed: int = 0,
    start: int = 0,
) -> torch.Tensor:
    """The images of one view family (one of VIEW_FAMILIES) of the panoramas, panorama-major."""
    if family == "full":
        return full(p)
    if family == "rolled":
        return rolled(p)
    if family == "crops":
        return random_crops(p, crops, size, seed, start)
    if family == "horizontal":
        return horizontal_crops(p, horizontal, size)
    if family in FACE_GROUPS:
        return cube_faces(p, family, size)
    raise ValueError(f"views: unknown view family {family!r}, expected one of {', '.join(ALL_FAMILIES)}")


def views_per_panorama(family: str, crops: int = 20, horizontal: int = 8) -> int:
    """How many images a view family makes of one panorama."""
    counts = {"full": 1, "rolled": 1, "crops": crops, "horizontal": horizontal,
              **{g: len(faces) for g, faces in FACE_GROUPS.items()}}
    if family not in counts:
        raise ValueError(f"views: unknown view family {family!r}, expected one of {', '.join(ALL_FAMILIES)}")
    return counts[family]
