"""Perspective crops and cube maps of equirectangular panoramas (docs/geometry.md geometry), batched torch."""

from __future__ import annotations

import math

import torch

from diffpano.geometry.spherical import (
    check_panorama_size,
    circular_grid_sample,
    direction_grid,
    direction_to_sample_grid,
    yaw_matrix,
)

# Faces in storage order with the (yaw, pitch) in degrees of the 90-degree view that renders them.
# The up face is what you see pitching up 90 degrees from the front view (its top edge borders the back face,
# its bottom edge the front face); the down face is pitching down 90 degrees from the front view (its top edge
# borders the front face). On both, image right is +x.
CUBE_FACES: tuple[str, ...] = ("front", "right", "back", "left", "up", "down")
CUBE_FACE_ANGLES: tuple[tuple[float, float], ...] = ((0, 0), (90, 0), (180, 0), (-90, 0), (0, 90), (0, -90))

Angle = float | torch.Tensor


def _check_positive_int(value: object, name: str) -> int:
    """Return value as int, or raise ValueError naming it unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def _check_fov(fov_deg: float) -> float:
    """Return fov_deg as float, or raise ValueError unless it lies in the open interval (0, 180)."""
    try:
        fov = float(fov_deg)
    except (TypeError, ValueError):
        raise ValueError(f"fov_deg: must be a number in (0, 180), got {fov_deg!r}") from None
    if not 0.0 < fov < 180.0:
        raise ValueError(f"fov_deg: must lie in (0, 180) degrees, got {fov_deg!r}")
    return fov


def _angle_tensor(value: Angle, name: str, device: torch.device | str | None) -> torch.Tensor:
    """An angle in degrees as a finite float64 tensor (scalar or any shape) on device."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: must be a number or a tensor of numbers, got {value!r}") from None
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: angles must be finite, got {value!r}")
    return t


def pitch_matrix(pitch: torch.Tensor | float) -> torch.Tensor:
    """Rotation (..., 3, 3) about +x; positive pitch (radians) turns the forward axis +z up, towards -y."""
    pitch = torch.as_tensor(pitch, dtype=torch.float64)
    c, s = pitch.cos(), pitch.sin()
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack((o, z, z, z, c, -s, z, s, c), dim=-1).reshape(*pitch.shape, 3, 3)


def view_rotation(yaw_deg: Angle, pitch_deg: Angle, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotation (..., 3, 3), float64, from a view's camera frame to the panorama frame: yaw(y) @ pitch(x)."""
    yaw = _angle_tensor(yaw_deg, "yaw_deg", device)
    pitch = _angle_tensor(pitch_deg, "pitch_deg", device)
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    # Forward (0, 0, 1) maps to (cos p sin y, -sin p, cos p cos y): docs/geometry.md longitude y, latitude p.
    return yaw_matrix(yaw.deg2rad()).to(yaw.device) @ pitch_matrix(pitch.deg2rad()).to(yaw.device)


def _pinhole_rays(
    height: int, width: int, fov: float, dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    """Unit rays (height, width, 3) of a pinhole camera looking along +z, x right, y down, square pixels."""
    focal = (width / 2) / math.tan(math.radians(fov) / 2)
    ys = (torch.arange(height, dtype=dtype, device=device) + 0.5 - height / 2) / focal
    xs = (torch.arange(width, dtype=dtype, device=device) + 0.5 - width / 2) / focal
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    rays = torch.stack((x, y, torch.ones_like(x)), dim=-1)
    return rays / rays.norm(dim=-1, keepdim=True)


def perspective_rays(
    height: int,
    width: int,
    fov_deg: float,
    yaw_deg: Angle = 0.0,
    pitch_deg: Angle = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit panorama-frame rays (..., height, width, 3) of a perspective view; tensor angles add leading dims."""
    height = _check_positive_int(height, "height")
    width = _check_positive_int(width, "width")
    fov = _check_fov(fov_deg)
    rays = _pinhole_rays(height, width, fov, torch.float64, device)
    rotation = view_rotation(yaw_deg, pitch_deg, device=rays.device)
    out = torch.einsum("...ij,hwj->...hwi", rotation, rays)
    return out.to(dtype)


def _check_pano(pano: torch.Tensor, name: str = "pano") -> None:
    """Raise ValueError unless pano is a float (C, H, W) or (B, C, H, W) tensor with W = 2H."""
    if not isinstance(pano, torch.Tensor) or pano.ndim not in (3, 4):
        got = tuple(pano.shape) if isinstance(pano, torch.Tensor) else type(pano).__name__
        raise ValueError(f"{name}: expected a tensor of shape (C, H, W) or (B, C, H, W), got {got}")
    if not pano.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {pano.dtype}")
    h, w = pano.shape[-2:]
    if h <= 0 or w <= 0 or pano.shape[-3] <= 0 or (pano.ndim == 4 and pano.shape[0] <= 0):
        raise ValueError(f"{name}: all dimensions must be positive, got {tuple(pano.shape)}")
    check_panorama_size(h, w, field=name)


def _ray_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for ray and grid arithmetic: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sample_views(pano: torch.Tensor, rays: torch.Tensor, per_batch: bool) -> torch.Tensor:
    """Sample pano (B, C, H, W) along rays (V, h, w, 3): (B, V, C, h, w), or (B, C, h, w) when per_batch (V == B)."""
    b, c = pano.shape[:2]
    v, h, w = rays.shape[:3]
    grid = direction_to_sample_grid(rays)
    if per_batch:
        return circular_grid_sample(pano, grid)
    # Stack the V views' grids vertically so one grid_sample call renders them all from each panorama.
    grid = grid.reshape(1, v * h, w, 2).expand(b, v * h, w, 2)
    return circular_grid_sample(pano, grid).reshape(b, c, v, h, w).transpose(1, 2)


def equirect_to_perspective(
    pano: torch.Tensor,
    fov_deg: float,
    yaw_deg: Angle = 0.0,
    pitch_deg: Angle = 0.0,
    out_height: int = 256,
    out_width: int = 256,
) -> torch.Tensor:
    """Bilinear perspective crop(s) of a panorama (C, H, W) or (B, C, H, W) with circular longitude.

    Shapes: (C, H, W) with scalar angles -> (C, h, w); (C, H, W) with angles of shape (N,) -> (N, C, h, w), N views
    of one panorama; (B, C, H, W) with scalar angles -> (B, C, h, w); (B, C, H, W) with angles of shape (B,) ->
    (B, C, h, w), one view per panorama.
    """
    _check_pano(pano)
    out_height = _check_positive_int(out_height, "out_height")
    out_width = _check_positive_int(out_width, "out_width")
    rays = perspective_rays(out_height, out_width, fov_deg, yaw_deg, pitch_deg, _ray_dtype(pano.dtype), pano.device)
    if rays.ndim > 4:
        raise ValueError(f"yaw_deg/pitch_deg: expected scalars or 1-D tensors, got view shape {tuple(rays.shape[:-3])}")
    scalar = rays.ndim == 3
    rays = rays.reshape(-1, out_height, out_width, 3)
    if pano.ndim == 3:
        out = _sample_views(pano.unsqueeze(0), rays, per_batch=False)[0]
        return out[0] if scalar else out
    if scalar:
        return _sample_views(pano, rays, per_batch=False)[:, 0]
    if rays.shape[0] != pano.shape[0]:
        raise ValueError(
            f"yaw_deg/pitch_deg: need one angle per panorama ({pano.shape[0]}) for batched pano, got {rays.shape[0]}"
        )
    return _sample_views(pano, rays, per_batch=True)


def cube_face_rays(
    face_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Unit panorama-frame rays (6, s, s, 3) of the cube faces in CUBE_FACES order."""
    yaws = torch.tensor([a[0] for a in CUBE_FACE_ANGLES], dtype=torch.float64)
    pitches = torch.tensor([a[1] for a in CUBE_FACE_ANGLES], dtype=torch.float64)
    rays = perspective_rays(face_size, face_size, 90.0, yaws, pitches, torch.float64, device)
    # Snap the rotation round-off (cos 90 deg ~ 6e-17) so face rays are exactly axis-aligned where they should be.
    return torch.where(rays.abs() < 1e-12, torch.zeros_like(rays), rays).to(dtype)


def equirect_to_cubemap(pano: torch.Tensor, face_size: int) -> torch.Tensor:
    """Cube map (..., 6, C, s, s) of a panorama (C, H, W) or (B, C, H, W); faces in CUBE_FACES order."""
    _check_pano(pano)
    face_size = _check_positive_int(face_size, "face_size")
    rays = cube_face_rays(face_size, _ray_dtype(pano.dtype), pano.device)
    batched = pano if pano.ndim == 4 else pano.unsqueeze(0)
    faces = _sample_views(batched, rays, per_batch=False)
    return faces if pano.ndim == 4 else faces[0]


def _check_faces(faces: torch.Tensor) -> None:
    """Raise ValueError unless faces is a float (6, C, s, s) or (B, 6, C, s, s) tensor."""
    shape = tuple(faces.shape) if isinstance(faces, torch.Tensor) else type(faces).__name__
    if not isinstance(faces, torch.Tensor) or faces.ndim not in (4, 5) or shape[-4] != 6 or shape[-1] != shape[-2]:
        raise ValueError(f"faces: expected a tensor of shape (6, C, s, s) or (B, 6, C, s, s), got {shape}")
    if min(shape) <= 0:
        raise ValueError(f"faces: all dimensions must be positive, got {shape}")
    if not faces.is_floating_point():
        raise ValueError(f"faces: expected a floating-point tensor, got {faces.dtype}")


def _face_index(d: torch.Tensor) -> torch.Tensor:
    """CUBE_FACES index of each direction (..., 3): the face whose axis has the largest |component|."""
    axis = d.abs().argmax(dim=-1)  # 0: x, 1: y, 2: z
    positive = d.gather(-1, axis.unsqueeze(-1)).squeeze(-1) >= 0
    # (axis, positive) -> face: x+ right 1, x- left 3, y+ down 5, y- up 4, z+ front 0, z- back 2.
    table = torch.tensor([[3, 1], [4, 5], [2, 0]], device=d.device)
    return table[axis, positive.long()]


def cubemap_to_equirect(faces: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Panorama (..., C, H, W) from a cube map (..., 6, C, s, s); bilinear within each face, clamped at its border."""
    _check_faces(faces)
    height = _check_positive_int(height, "height")
    width = _check_positive_int(width, "width")
    check_panorama_size(height, width, field="width")
    batched = faces if faces.ndim == 5 else faces.unsqueeze(0)
    b, _, c, s, _ = batched.shape
    dtype = _ray_dtype(faces.dtype)
    d = direction_grid(height, width, dtype, faces.device)  # (H, W, 3)
    face = _face_index(d)
    rotations = view_rotation(
        torch.tensor([a[0] for a in CUBE_FACE_ANGLES]), torch.tensor([a[1] for a in CUBE_FACE_ANGLES]), faces.device
    ).to(dtype)
    local = torch.einsum("hwji,hwj->hwi", rotations[face], d)  # R^T d in the face's own camera frame
    # A 90-degree face has focal s/2, so grid_sample's x (align_corners=False) is exactly x/z; likewise y.
    edge = 1.0 - 1.0 / s  # centre of the border pixels: bilinear weights never reach the neighbouring face
    xy = (local[..., :2] / local[..., 2:]).clamp(-edge, edge)
    # The six faces are stacked vertically into one (6s x s) image; face f occupies rows [f*s, (f+1)*s).
    y = (face.to(dtype) + (xy[..., 1] + 1) / 2) / 3 - 1
    grid = torch.stack((xy[..., 0], y), dim=-1).unsqueeze(0).expand(b, height, width, 2)
    atlas = batched.permute(0, 2, 1, 3, 4).reshape(b, c, 6 * s, s)
    out = torch.nn.functional.grid_sample(
        atlas, grid.to(faces.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out if faces.ndim == 5 else out[0]
