"""Perspective walk-through videos of panorama tours (docs/geometry.md conventions), written as GIF or MP4."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffpano.geometry.projection import equirect_to_perspective
from diffpano.geometry.spherical import check_panorama_size, validate_poses

VIDEO_SUFFIXES: tuple[str, ...] = (".gif", ".mp4")


def _check_panoramas(panoramas: Sequence[np.ndarray]) -> None:
    """Raise ValueError unless panoramas is a non-empty list of H x 2H x 3 uint8 arrays."""
    if not isinstance(panoramas, (list, tuple)) or not panoramas:
        raise ValueError("panoramas: expected a non-empty list of H x W x 3 uint8 arrays")
    for i, pano in enumerate(panoramas):
        if not isinstance(pano, np.ndarray) or pano.dtype != np.uint8 or pano.ndim != 3 or pano.shape[2] != 3:
            desc = f"{pano.dtype} {pano.shape}" if isinstance(pano, np.ndarray) else type(pano).__name__
            raise ValueError(f"panoramas[{i}]: expected an H x W x 3 uint8 array, got {desc}")
        h, w = pano.shape[:2]
        check_panorama_size(h, w, field=f"panoramas[{i}]")


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    """Return value as int, or raise ValueError naming it unless it is an integer in [low, high]."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be an integer {bound}, got {value!r}")
    return int(value)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Return size as (height, width), or raise ValueError unless it is two positive integers."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size: expected (height, width), got {size!r}")
    return _check_int(size[0], "size", 1), _check_int(size[1], "size", 1)


def _wrap(angle: np.ndarray | float) -> np.ndarray | float:
    """Angle(s) in radians wrapped into [-pi, pi)."""
    return (np.asarray(angle) + math.pi) % (2 * math.pi) - math.pi


def segment_headings(poses: np.ndarray) -> np.ndarray:
    """World headings (N-1,) in radians, atan2(x, z), of the horizontal moves between consecutive centres."""
    centres = poses[:, :3, 3]
    moves = np.diff(centres, axis=0)
    horizontal = moves[:, [0, 2]]  # gravity is +y, so the horizontal plane is x-z
    length = np.linalg.norm(horizontal, axis=1)
    headings = np.arctan2(horizontal[:, 0], horizontal[:, 1])
    valid = length > 1e-9
    if not valid.any():
        return np.full(len(moves), np.nan)
    # A segment without horizontal motion keeps the heading of the nearest segment that has one.
    idx = np.flatnonzero(valid)
    nearest = idx[np.abs(np.arange(len(moves))[:, None] - idx[None, :]).argmin(axis=1)]
    return headings[nearest]


def _fallback_heading(rotation: np.ndarray) -> float:
    """World heading of a camera's forward axis (its yaw 0); 0 (world +z) when the camera looks straight up/down."""
    forward = rotation[:, 2]
    if math.hypot(forward[0], forward[2]) < 1e-6:
        return 0.0
    return math.atan2(forward[0], forward[2])


def view_heading_ranges(poses: np.ndarray) -> np.ndarray:
    """(N, 2) world headings in radians (start, end) of each view: incoming and outgoing segment headings."""
    n = poses.shape[0]
    seg = segment_headings(poses)
    if n == 1 or np.isnan(seg).all():
        # No motion at all: keep looking where the first view looks (its yaw 0) for the whole tour.
        return np.full((n, 2), _fallback_heading(poses[0, :3, :3]))
    incoming = np.concatenate((seg[:1], seg))
    outgoing = np.concatenate((seg, seg[-1:]))
    return np.stack((incoming, outgoing), axis=1)


def _frame_headings(start: float, end: float, count: int) -> np.ndarray:
    """count world headings from start to end along the shortest angular path, both ends included."""
    t = np.arange(count) / max(count - 1, 1)
    return start + t * _wrap(end - start)


def camera_angles(rotation: np.ndarray, headings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(yaw_deg, pitch_deg) in a camera's own frame of world headings, given the camera-to-world rotation R."""
    world = np.stack((np.sin(headings), np.zeros_like(headings), np.cos(headings)), axis=-1)
    local = world @ rotation  # rows are R^T h
    yaw = np.degrees(np.arctan2(local[:, 0], local[:, 2]))
    # 0 for upright (gravity-aligned) cameras; for a tilted camera it keeps the view on the horizon.
    pitch = np.degrees(np.arcsin(np.clip(-local[:, 1], -1.0, 1.0)))
    return yaw, pitch


def _render(
    pano: torch.Tensor, rotation: np.ndarray, headings: np.ndarray, fov: float, size: tuple[int, int]
) -> torch.Tensor:
    """Float frames (F, 3, h, w) in [0, 1] of one panorama (3, H, W) looking along world headings (F,)."""
    yaw, pitch = camera_angles(rotation, headings)
    return equirect_to_perspective(
        pano, fov, torch.from_numpy(yaw), torch.from_numpy(pitch), out_height=size[0], out_width=size[1]
    )


def _to_uint8(frames: torch.Tensor) -> list[np.ndarray]:
    """Frames (F, 3, h, w) in [0, 1] as a list of h x w x 3 uint8 arrays."""
    arr = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return list(arr)


def walkthrough_frames(
    panoramas: list[np.ndarray],
    poses: np.ndarray,
    frames_per_view: int = 12,
    fov_deg: float = 90,
    size: tuple[int, int] = (240, 320),
    crossfade: int | None = None,
) -> list[np.ndarray]:
    """Render a perspective walk-through of a tour: N * frames_per_view frames (h x w x 3 uint8), looking ahead.

    View i fills frames [i*F, (i+1)*F). Its world heading turns along the shortest path from the incoming segment's
    heading to the outgoing one's (the first view starts, and the last ends, on its only segment). Its last
    `crossfade` frames (default: 4, at most frames_per_view) blend towards view i+1 rendered at the same heading,
    with weights 1/(c+1) ... c/(c+1).
    """
    _check_panoramas(panoramas)
    n = len(panoramas)
    pose_arr = np.asarray(poses, dtype=np.float64)
    if pose_arr.shape != (n, 4, 4):
        raise ValueError(f"poses: expected shape ({n}, 4, 4), one pose per panorama, got {pose_arr.shape}")
    validate_poses(torch.from_numpy(pose_arr), field="poses")
    f = _check_int(frames_per_view, "frames_per_view", 1)
    c = _check_int(min(4, f) if crossfade is None else crossfade, "crossfade", 0, f)
    size = _check_size(size)
    ranges = view_heading_ranges(pose_arr)
    tensors = [torch.from_numpy(np.array(p, dtype=np.uint8)).permute(2, 0, 1).float().div(255) for p in panoramas]
    frames: list[np.ndarray] = []
    for i in range(n):
        headings = _frame_headings(ranges[i, 0], ranges[i, 1], f)
        view = _render(tensors[i], pose_arr[i, :3, :3], headings, fov_deg, size)
        if i + 1 < n and c > 0:
            nxt = _render(tensors[i + 1], pose_arr[i + 1, :3, :3], headings[f - c :], fov_deg, size)
            weight = torch.arange(1, c + 1, dtype=view.dtype).div(c + 1).view(c, 1, 1, 1)
            view[f - c :] = view[f - c :] * (1 - weight) + nxt * weight
        frames.extend(_to_uint8(view))
    return frames


def _check_frames(frames: Sequence[np.ndarray]) -> tuple[int, int]:
    """Raise ValueError unless frames is a non-empty list of equal-size h x w x 3 uint8 arrays; return (h, w)."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ValueError("frames: expected a non-empty list of h x w x 3 uint8 arrays")
    first = frames[0]
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"frames[{i}]: expected an h x w x 3 uint8 array, got {desc}")
        if frame.shape != first.shape or min(frame.shape) <= 0:
            raise ValueError(f"frames[{i}]: all frames need the same non-empty size {first.shape}, got {frame.shape}")
    return first.shape[0], first.shape[1]


def _write_gif(frames: Sequence[np.ndarray], path: Path, fps: int) -> None:
    """Write an endlessly looping GIF with Pillow (identical consecutive frames merge, keeping their time)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    duration = max(round(1000 / fps), 10)
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False
    )


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad a frame by edge replication to even height and width (yuv420p needs them)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_mp4(frames: Sequence[np.ndarray], path: Path, fps: int) -> None:
    """Write an H.264 (libx264, yuv420p) MP4 through imageio's ffmpeg backend."""
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        str(path),
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            writer.append_data(_even(frame))
    finally:
        writer.close()


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 12) -> Path:
    """Write frames as a .gif (Pillow) or .mp4 (H.264) video atomically (temporary file, then rename); return path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"out: {str(path)!r} has an unsupported suffix; allowed suffixes: {', '.join(VIDEO_SUFFIXES)}")
    _check_frames(frames)
    fps = _check_int(fps, "fps", 1)
    if not path.parent.is_dir():
        raise ValueError(f"out: folder {str(path.parent)!r} does not exist")
    # Same folder so the rename is atomic; the real suffix last because ffmpeg picks the container from it.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial{suffix}")
    try:
        (_write_gif if suffix == ".gif" else _write_mp4)(frames, tmp, fps)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
