"""Spherical geometry of equirectangular panoramas, poses and epipolar arcs (docs/geometry.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POSE_ATOL = 1e-4


def check_panorama_size(height: int, width: int, multiple: int = 1, field: str = "size") -> None:
    """Raise ValueError unless width == 2*height and both are positive multiples of `multiple`."""
    if height <= 0 or width <= 0:
        raise ValueError(f"{field}: height and width must be positive, got {height}x{width}")
    if width != 2 * height:
        raise ValueError(f"{field}: equirectangular panoramas need width = 2*height, got {height}x{width}")
    if height % multiple or width % multiple:
        raise ValueError(f"{field}: height and width must be multiples of {multiple}, got {height}x{width}")


def pixel_to_direction(u: torch.Tensor, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unit camera-frame direction (..., 3) of pixel (u, v) per docs/geometry.md (pixel centres at +0.5)."""
    theta = 2 * math.pi * (u + 0.5) / width - math.pi
    phi = math.pi / 2 - math.pi * (v + 0.5) / height
    return torch.stack((phi.cos() * theta.sin(), -phi.sin(), phi.cos() * theta.cos()), dim=-1)


def direction_to_pixel(d: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous pixel coordinates (u, v) of directions (..., 3); inverse of pixel_to_direction."""
    theta, phi = direction_to_angles(d)
    u = width * (theta + math.pi) / (2 * math.pi) - 0.5
    v = height * (math.pi / 2 - phi) / math.pi - 0.5
    return u, v


def direction_to_angles(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longitude theta in [-pi, pi] and latitude phi in [-pi/2, pi/2] of directions (..., 3)."""
    d = F.normalize(d, dim=-1)
    theta = torch.atan2(d[..., 0], d[..., 2])
    phi = torch.asin((-d[..., 1]).clamp(-1.0, 1.0))
    return theta, phi


def direction_grid(
    height: int, width: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Directions (height, width, 3) of every pixel centre of an H x W panorama."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    return pixel_to_direction(u, v, height, width)


def direction_to_sample_grid(d: torch.Tensor) -> torch.Tensor:
    """grid_sample coordinates (..., 2) in [-1, 1] (align_corners=False) of directions (..., 3)."""
    theta, phi = direction_to_angles(d)
    # x = 2*u_c/W - 1 with u_c = W*(theta+pi)/(2pi) simplifies to theta/pi; likewise y = -2*phi/pi.
    return torch.stack((theta / math.pi, -2.0 * phi / math.pi), dim=-1)


def circular_grid_sample(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear grid_sample of (B, C, h, w) panoramas whose longitude wraps around (columns 0 and w-1 meet)."""
    w = features.shape[-1]
    padded = torch.cat((features[..., -1:], features, features[..., :1]), dim=-1)
    x = torch.remainder(grid[..., 0] + 1, 2.0)  # longitude wrapped into [0, 2), i.e. x in [-1, 1)
    x = (x * w / 2 + 1) * 2 / (w + 2) - 1  # the same point in the padded map's coordinates
    grid = torch.stack((x, grid[..., 1]), dim=-1)
    # fp16/bf16 features are sampled in fp32: positions need more than bf16's 8 mantissa bits
    dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    out = F.grid_sample(padded.to(dtype), grid.to(dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(features.dtype)


def as_pose_tensor(poses: torch.Tensor | Sequence, field: str = "poses") -> torch.Tensor:
    """Poses as a float tensor (..., 4, 4), accepting (..., 16) row-major lists too."""
    t = poses if isinstance(poses, torch.Tensor) else torch.as_tensor(poses, dtype=torch.float64)
    if t.shape[-1:] == (16,):
        t = t.reshape(*t.shape[:-1], 4, 4)
    if t.ndim < 2 or t.shape[-2:] != (4, 4):
        raise ValueError(f"{field}: each pose must be 16 numbers or a 4x4 matrix, got shape {tuple(t.shape)}")
    return t if t.is_floating_point() else t.double()


def validate_poses(poses: torch.Tensor | Sequence, field: str = "poses", atol: float = POSE_ATOL) -> torch.Tensor:
    """Check camera-to-world poses (docs/geometry.md) and return them as (..., 4, 4); ValueError names the pose."""
    t = as_pose_tensor(poses, field)
    flat = t.reshape(-1, 4, 4).double()
    for i, pose in enumerate(flat):
        where = f"{field}[{i}]" if t.ndim > 2 else field
        if not torch.isfinite(pose).all():
            raise ValueError(f"{where}: all 16 numbers must be finite")
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=pose.dtype)
        if (pose[3] - bottom).abs().max() > atol:
            raise ValueError(f"{where}: the last row must be (0, 0, 0, 1), got {pose[3].tolist()}")
        r = pose[:3, :3]
        ortho = (r.T @ r - torch.eye(3, dtype=r.dtype)).abs().max().item()
        if ortho > atol:
            raise ValueError(f"{where}: rotation part is not orthonormal (max |R^T R - I| = {ortho:.2e} > {atol})")
        det = torch.linalg.det(r).item()
        if abs(det - 1.0) > atol:
            raise ValueError(f"{where}: rotation part must have determinant +1, got {det:.4f}")
    return t


def relative_pose(pose_t: torch.Tensor, pose_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_st, c_st): rotation of t-frame directions into s's frame and t's centre in s's frame (docs/geometry.md)."""
    r_s, r_t = pose_s[..., :3, :3], pose_t[..., :3, :3]
    r_st = r_s.transpose(-1, -2) @ r_t
    c_st = (r_s.transpose(-1, -2) @ (pose_t[..., :3, 3] - pose_s[..., :3, 3]).unsqueeze(-1)).squeeze(-1)
    return r_st, c_st


def yaw_matrix(yaw: torch.Tensor | float) -> torch.Tensor:
    """Rotation (..., 3, 3) about the gravity axis +y; positive yaw turns the forward axis +z towards +x."""
    yaw = torch.as_tensor(yaw, dtype=torch.float64)
    c, s = yaw.cos(), yaw.sin()
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack((c, z, s, z, o, z, -s, z, c), dim=-1).reshape(*yaw.shape, 3, 3)


def make_pose(rotation: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Camera-to-world pose (..., 4, 4) from rotation (..., 3, 3) and centre (..., 3)."""
    pose = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=rotation.dtype, device=rotation.device)
    pose[..., :3, :3] = rotation
    pose[..., :3, 3] = centre
    pose[..., 3, 3] = 1.0
    return pose


def inverse_depth_samples(num_samples: int, near: float, far: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """S depths in metres, near to far, at the centres of S equal bins in inverse depth."""
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    if not 0 < near < far:
        raise ValueError(f"near/far: need 0 < near < far, got near={near}, far={far}")
    frac = (torch.arange(num_samples, dtype=torch.float64) + 0.5) / num_samples
    inv = 1.0 / near + frac * (1.0 / far - 1.0 / near)
    return (1.0 / inv).to(dtype=dtype, device=device)


def nearest_views(poses: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (..., N, K) of each view's K nearest other views by camera centre, and a validity mask."""
    n = poses.shape[-3]
    if k < 1:
        raise ValueError(f"num_ref_views: must be >= 1, got {k}")
    centres = poses[..., :3, 3].double()
    dist = torch.cdist(centres, centres)
    order = torch.arange(n, device=poses.device, dtype=torch.float64)
    dist = dist + 1e-6 * (order[:, None] - order[None, :]).abs()  # ties go to the closest index
    dist = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype, device=dist.device))
    kk = min(k, n)
    idx = dist.topk(kk, dim=-1, largest=False).indices
    valid = torch.isfinite(dist.gather(-1, idx))
    if kk < k:
        pad = k - kk
        self_idx = torch.arange(n, device=poses.device).expand(*idx.shape[:-1], n)[..., :1].expand(*idx.shape[:-1], pad)
        idx = torch.cat((idx, self_idx.clone()), dim=-1)
        valid = torch.cat((valid, torch.zeros_like(valid[..., :1]).expand(*valid.shape[:-1], pad)), dim=-1)
    idx = torch.where(valid, idx, torch.arange(n, device=poses.device).view(n, 1).expand_as(idx))
    return idx, valid


@dataclass
class EpipolarSamples:
    """S samples on the epipolar arcs of every target pixel in each of its K reference views."""

    grid: torch.Tensor  # (..., N, K, h*w, S, 2) grid_sample coordinates in the reference view
    mask: torch.Tensor  # (..., N, K, h*w, S) True where the sample is usable
    depth: torch.Tensor  # (S,) range along the target ray, metres
    source_dirs: torch.Tensor  # (..., N, K, h*w, S, 3) sample directions in the reference camera frame
    distance: torch.Tensor  # (..., N, K, h*w, S) distance of each sample from the reference camera, metres
    ray_dirs: torch.Tensor  # (..., N, K, h*w, 3) the target ray direction rotated into the reference frame


def epipolar_samples(
    poses: torch.Tensor,
    ref_index: torch.Tensor,
    ref_valid: torch.Tensor,
    height: int,
    width: int,
    num_samples: int,
    near: float = 0.3,
    far: float = 15.0,
) -> EpipolarSamples:
    """Sample every target pixel's epipolar arc at S inverse-uniform depths in each of its K reference views."""
    check_panorama_size(height, width, field="feature map")
    dtype, device = torch.float32, poses.device
    poses = poses.to(dtype)
    n = poses.shape[-3]
    if ref_index.shape[:-1] != poses.shape[:-2] or ref_index.shape != ref_valid.shape:
        raise ValueError(f"ref_index: expected shape (..., {n}, K), got {tuple(ref_index.shape)}")
    ref_poses = torch.gather(
        poses.unsqueeze(-4).expand(*poses.shape[:-3], n, n, 4, 4),  # [..., t, m] = pose of view m
        -3,
        ref_index[..., None, None].expand(*ref_index.shape, 4, 4),
    )  # (..., N, K, 4, 4)
    r_st, c_st = relative_pose(poses.unsqueeze(-3).expand_as(ref_poses), ref_poses)
    dirs = direction_grid(height, width, dtype, device).reshape(-1, 3)  # (hw, 3)
    ray = torch.einsum("...ij,pj->...pi", r_st, dirs)  # (..., N, K, hw, 3)
    depth = inverse_depth_samples(num_samples, near, far, dtype, device)
    points = ray.unsqueeze(-2) * depth.view(-1, 1) + c_st[..., None, None, :]  # (..., N, K, hw, S, 3)
    dist = points.norm(dim=-1)
    src = points / dist.clamp_min(1e-8).unsqueeze(-1)
    mask = (dist > 1e-4) & ref_valid[..., None, None]
    return EpipolarSamples(direction_to_sample_grid(src), mask, depth, src, dist, ray)
