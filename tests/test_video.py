"""Tests of diffpano.io.video: walk-through headings, cross-fades and GIF/MP4 writing."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from diffpano.geometry.spherical import direction_grid, yaw_matrix
from diffpano.io import video
from diffpano.io.video import view_heading_ranges, walkthrough_frames, write_video

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SIZE = (24, 32)


def region_pano(regions: list[tuple[tuple[float, float, float], tuple[int, int, int]]], height: int = 64) -> np.ndarray:
    """A (H, 2H, 3) uint8 panorama, blue except within 40 degrees of each given camera-frame axis (that colour)."""
    d = direction_grid(height, 2 * height, torch.float64).numpy()
    pano = np.empty((height, 2 * height, 3), np.uint8)
    pano[:] = BLUE
    for axis, colour in regions:
        pano[d @ np.asarray(axis, dtype=np.float64) > math.cos(math.radians(40))] = colour
    return pano


def pose(yaw_deg: float = 0.0, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Camera-to-world pose of an upright camera turned by yaw_deg at centre."""
    p = np.eye(4)
    p[:3, :3] = yaw_matrix(math.radians(yaw_deg)).numpy()
    p[:3, 3] = centre
    return p


def centre_colour(frame: np.ndarray) -> tuple[int, ...]:
    """The mean colour of the central 4 x 4 pixels, rounded."""
    h, w = frame.shape[:2]
    return tuple(round(float(c)) for c in frame[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2].mean(axis=(0, 1)))


def test_walk_along_x_looks_along_x() -> None:
    pano = region_pano([((1, 0, 0), RED)])
    poses = np.stack([pose(0, (float(i), 0, 0)) for i in range(3)])
    frames = walkthrough_frames([pano] * 3, poses, frames_per_view=4, fov_deg=90, size=SIZE, crossfade=2)
    assert len(frames) == 12
    for frame in frames:
        assert frame.shape == (*SIZE, 3) and frame.dtype == np.uint8
        assert centre_colour(frame) == RED
        assert tuple(frame[0, 0]) == BLUE  # the corner of a 90-degree view is outside the 40-degree red cap


def test_heading_turns_between_segments() -> None:
    # Walk +x, then +z: view 1 turns from +x (heading 90) to +z (heading 0); view 2 keeps looking along +z.
    pano = region_pano([((1, 0, 0), RED), ((0, 0, 1), GREEN)])
    poses = np.stack([pose(0, (0, 0, 0)), pose(0, (1, 0, 0)), pose(0, (1, 0, 1))])
    frames = walkthrough_frames([pano] * 3, poses, frames_per_view=5, size=SIZE, crossfade=0)
    assert len(frames) == 15
    colours = [centre_colour(f) for f in frames]
    assert colours[:7] == [RED] * 7  # view 0, then view 1 at headings 90 and 67.5
    assert colours[8:] == [GREEN] * 7  # view 1 at headings 22.5 and 0, then view 2
    assert colours[7] not in (RED, GREEN)  # heading 45 degrees: between the caps
    np.testing.assert_allclose(np.degrees(view_heading_ranges(poses)), [[90, 90], [90, 0], [0, 0]], atol=1e-9)


def test_turn_takes_the_shortest_path_across_180_degrees() -> None:
    # Segment headings 170 then -170 degrees: view 1 turns through 180 (-z), not through 0 (+z).
    pano = region_pano([((0, 0, -1), RED), ((0, 0, 1), GREEN)])
    a, b = math.radians(170), math.radians(-170)
    c1 = (math.sin(a), 0.0, math.cos(a))
    c2 = (c1[0] + math.sin(b), 0.0, c1[2] + math.cos(b))
    poses = np.stack([pose(0, (0, 0, 0)), pose(0, c1), pose(0, c2)])
    frames = walkthrough_frames([pano] * 3, poses, frames_per_view=5, size=SIZE, crossfade=0)
    assert centre_colour(frames[7]) == RED  # middle frame of view 1: heading 180


def test_world_heading_is_converted_into_each_camera_frame() -> None:
    # Camera 0 is turned 90 degrees (its forward +z is world +x) and walks along world +x, so it looks along its own
    # +z (red); camera 1 is upright, so the same world heading is its own +x (green).
    red_ahead = region_pano([((0, 0, 1), RED)])
    green_right = region_pano([((1, 0, 0), GREEN)])
    poses = np.stack([pose(90, (0, 0, 0)), pose(0, (2, 0, 0))])
    frames = walkthrough_frames([red_ahead, green_right], poses, frames_per_view=3, size=SIZE, crossfade=0)
    assert [centre_colour(f) for f in frames] == [RED] * 3 + [GREEN] * 3


def test_vertical_motion_is_ignored_and_still_tours_keep_the_first_view_heading() -> None:
    still = np.stack([pose(30, (0, 0, 0)), pose(0, (0, -1, 0)), pose(-50, (0, 0, 0))])
    np.testing.assert_allclose(view_heading_ranges(still), math.radians(30), atol=1e-12)
    np.testing.assert_allclose(view_heading_ranges(still[:1]), math.radians(30), atol=1e-12)
    # A pause (repeated centre) in a walk along -z keeps the walk's heading.
    paused = np.stack([pose(0, (0, 0, 0)), pose(0, (0, 0, 0)), pose(0, (0, 0, -1))])
    np.testing.assert_allclose(np.abs(view_heading_ranges(paused)), math.pi, atol=1e-12)


def test_crossfade_blends_into_the_next_view() -> None:
    black, white = np.zeros((32, 64, 3), np.uint8), np.full((32, 64, 3), 255, np.uint8)
    poses = np.stack([pose(0, (0, 0, 0)), pose(0, (1, 0, 0))])
    frames = walkthrough_frames([black, white], poses, frames_per_view=6, size=(8, 10), crossfade=3)
    assert len(frames) == 12
    levels = [int(f.mean().round()) for f in frames]
    assert levels == [0, 0, 0, 64, 128, 191] + [255] * 6
    assert all(np.ptp(f) <= 1 for f in frames)  # uniform up to rounding


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"poses": np.stack([pose()] * 3)}, "poses"),
        ({"poses": np.stack([pose(), np.diag([1.0, 1.0, 2.0, 1.0])])}, "poses"),
        ({"panoramas": [np.zeros((8, 10, 3), np.uint8)] * 2}, "panoramas"),
        ({"panoramas": [np.zeros((8, 16, 3), np.float32)] * 2}, "panoramas"),
        ({"panoramas": []}, "panoramas"),
        ({"frames_per_view": 0}, "frames_per_view"),
        ({"crossfade": 5}, "crossfade"),
        ({"crossfade": -1}, "crossfade"),
        ({"size": (0, 8)}, "size"),
        ({"size": (8,)}, "size"),
        ({"fov_deg": 180}, "fov_deg"),
    ],
)
def test_walkthrough_bad_input_names_the_argument(kwargs: dict, name: str) -> None:
    args = {
        "panoramas": [np.zeros((8, 16, 3), np.uint8)] * 2,
        "poses": np.stack([pose(), pose(0, (1, 0, 0))]),
        "frames_per_view": 4,
        "size": (8, 8),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        walkthrough_frames(**args)


def moving_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    """count distinct frames: a bright square that moves right one step per frame."""
    frames = []
    for i in range(count):
        frame = np.full((height, width, 3), 30, np.uint8)
        frame[4:12, 2 + 3 * i : 10 + 3 * i] = (250, 200, 40)
        frames.append(frame)
    return frames


def test_write_gif(tmp_path: Path) -> None:
    out = write_video(moving_frames(5, 24, 32), tmp_path / "tour.gif", fps=10)
    assert out == tmp_path / "tour.gif"
    assert [p.name for p in tmp_path.iterdir()] == ["tour.gif"]  # no temporary file left behind
    with Image.open(out) as gif:
        assert gif.n_frames == 5 and gif.size == (32, 24)
        assert gif.info["loop"] == 0 and gif.info["duration"] == 100
        gif.seek(4)
        frame = np.asarray(gif.convert("RGB"))
    assert np.abs(frame[8, 20].astype(int) - (250, 200, 40)).max() < 12  # the square, moved to columns 14-21


def test_write_mp4_pads_odd_sizes(tmp_path: Path) -> None:
    out = write_video(moving_frames(6, 25, 33), str(tmp_path / "tour.MP4"), fps=12)
    assert [p.name for p in tmp_path.iterdir()] == ["tour.MP4"]
    reader = imageio.get_reader(out, format="FFMPEG")
    try:
        frames = [frame for frame in reader]  # list(reader) trips on len() == inf
        assert reader.get_meta_data()["fps"] == pytest.approx(12)
    finally:
        reader.close()
    assert len(frames) == 6
    assert frames[0].shape == (26, 34, 3)
    assert np.abs(frames[0][8, 6].astype(int) - (250, 200, 40)).max() < 30
    assert np.abs(frames[0][20, 30].astype(int) - 30).max() < 30


def test_write_video_renders_a_walkthrough(tmp_path: Path) -> None:
    pano = region_pano([((1, 0, 0), RED)], height=32)
    poses = np.stack([pose(0, (0, 0, 0)), pose(0, (1, 0, 1))])
    frames = walkthrough_frames([pano, pano], poses, frames_per_view=3, size=(16, 16), crossfade=1)
    out = write_video(frames, tmp_path / "walk.gif")
    with Image.open(out) as gif:
        durations = [f.info["duration"] for f in ImageSequence.Iterator(gif)]
    # identical consecutive frames merge, keeping their time: 2 views x 3 frames at 12 fps last 6 x 83 ms in all
    assert gif.size == (16, 16) and len(frames) == 6 and abs(sum(durations) - 6 * 83) < 10, durations  # GIF: 10 ms


@pytest.mark.parametrize("suffix", [".avi", ".png", ""])
def test_write_video_rejects_other_suffixes(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ValueError, match=r"out.*\.gif.*\.mp4"):
        write_video(moving_frames(2, 8, 8), tmp_path / f"tour{suffix}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frames, fps, name",
    [([], 12, "frames"), ([np.zeros((8, 8), np.uint8)], 12, "frames"), (moving_frames(2, 24, 32), 0, "fps")],
)
def test_write_video_bad_input(tmp_path: Path, frames: list, fps: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        write_video(frames, tmp_path / "x.gif", fps=fps)


def test_failed_write_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(frames, path, fps):
        Path(path).write_bytes(b"half a video")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video, "_write_mp4", broken)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(moving_frames(2, 8, 8), tmp_path / "tour.mp4")
    assert list(tmp_path.iterdir()) == []
