"""Camera trajectories for tours: a walk, an orbit, or poses read from JSON (camera-to-world, docs/geometry.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from diffpano.defaults import DEFAULT_VIEWS
from diffpano.geometry.spherical import make_pose, validate_poses, yaw_matrix

WALK_PARAMS = {"spacing": 1.0, "turn_deg": 0.0, "heading_deg": 0.0}
ORBIT_PARAMS = {"radius": 1.5, "arc_deg": 360.0}
MAX_EXTENT_M = 1000.0


def walk(num_views: int, spacing: float = 1.0, turn_deg: float = 0.0, heading_deg: float = 0.0) -> torch.Tensor:
    """Eye-level walk of num_views steps `spacing` metres apart, turning turn_deg per step; cameras face forward."""
    headings = torch.deg2rad(torch.tensor(heading_deg, dtype=torch.float64) + turn_deg * torch.arange(num_views))
    step = torch.stack((headings.sin(), torch.zeros_like(headings), headings.cos()), -1) * spacing
    centres = torch.cat((torch.zeros(1, 3, dtype=torch.float64), step[:-1].cumsum(0)))
    return make_pose(yaw_matrix(headings), centres)


def orbit(num_views: int, radius: float = 1.5, arc_deg: float = 360.0) -> torch.Tensor:
    """Cameras on a horizontal circle of `radius` around the origin, spread over arc_deg, facing along the circle."""
    span = math.radians(arc_deg)
    angles = torch.arange(num_views, dtype=torch.float64) * (span / num_views if arc_deg >= 360 else
                                                             span / max(num_views - 1, 1))
    centres = torch.stack((angles.sin() * radius, torch.zeros_like(angles), -angles.cos() * radius), -1)
    return make_pose(yaw_matrix(angles + math.pi / 2), centres)


def trajectory_params(kind: str, params: dict | None = None) -> dict:
    """The checked parameters of a named trajectory; ValueError names an unknown kind or parameter or a bad value."""
    defaults = {"walk": WALK_PARAMS, "orbit": ORBIT_PARAMS}.get(kind)
    if defaults is None:
        raise ValueError(f"trajectory.kind: must be 'walk' or 'orbit', got {kind!r}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"trajectory: unknown parameter(s) {unknown} for {kind!r}; allowed: {sorted(defaults)}")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"trajectory.{key}: must be a finite number, got {value!r}")
        if abs(value) > MAX_EXTENT_M and key in ("spacing", "radius"):
            raise ValueError(f"trajectory.{key}: must be at most {MAX_EXTENT_M} m, got {value}")
    if kind == "orbit" and params.get("radius", 1.0) <= 0:
        raise ValueError("trajectory.radius: must be > 0")
    return params


def named_trajectory(kind: str, num_views: int, params: dict | None = None) -> torch.Tensor:
    """Poses (N, 4, 4) of a named trajectory; ValueError names an unknown kind or parameter or a bad value."""
    params = trajectory_params(kind, params)
    if num_views < 1:
        raise ValueError(f"num_views: must be >= 1, got {num_views}")
    return (walk if kind == "walk" else orbit)(num_views, **params)


def load_trajectory(path: str | Path, num_views: int | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """Poses from JSON: a list of 16-number poses, {"poses": [...], "prompts": [...]}, or {"kind": ..., params}
    (num_views of them, by default DEFAULT_VIEWS)."""
    data = json.loads(Path(path).read_text())
    prompts = None
    if isinstance(data, dict) and "kind" in data:
        params = {k: v for k, v in data.items() if k != "kind"}
        return named_trajectory(data["kind"], num_views or DEFAULT_VIEWS, params), None
    if isinstance(data, dict):
        prompts = data.get("prompts")
        data = data.get("poses")
    if not isinstance(data, list) or not data:
        raise ValueError(f"trajectory: {path} must hold a non-empty list of poses")
    poses = validate_poses(data, field="trajectory.poses").double()
    if num_views is not None and len(poses) != num_views:
        raise ValueError(f"num_views: {num_views} views asked for but {path} has {len(poses)} poses")
    return poses, prompts
