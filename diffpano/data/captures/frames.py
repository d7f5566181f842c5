"""Frames of a 360-degree capture and the ones worth reconstructing: an image folder in name order or a video sampled
at a rate, each frame named by a source URI; blurred frames (Laplacian variance well under the capture's median)
and still ones (hardly different from the last kept frame) are dropped and counted."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
BLUR_RATIO = 0.4  # a frame whose sharpness is under this share of the capture's median is blurred
STILL_LEVELS = 1.5  # mean absolute difference (of 255) of 32x64 thumbnails under which the camera has not moved
STATS_HEIGHT = 256  # sharpness is measured at this height, on the band within 45 degrees of the horizon


@dataclass
class Frames:
    """The kept frames of a capture (H, 2H, 3) uint8 with their source URIs, and what was dropped."""

    images: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    read: int = 0
    blurred: int = 0
    still: int = 0


def natural_key(name: str) -> list:
    """Sort key that orders 'frame2' before 'frame10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def is_capture(path: str) -> bool:
    """Whether a path is a capture: a video file, or a folder holding panoramic images."""
    if os.path.isdir(path):
        return any(n.lower().endswith(IMAGE_SUFFIXES) for n in os.listdir(path))
    return path.lower().endswith(VIDEO_SUFFIXES)


def check_panorama(size: tuple[int, int], uri: str) -> None:
    """ValueError naming the source unless (width, height) is an equirectangular 2:1 frame."""
    width, height = size
    if width != 2 * height or height < 64:
        raise ValueError(f"{uri}: not an equirectangular panorama (width = 2 x height, at least 64 high), "
                         f"got {width}x{height}")


def image_frames(folder: str, height: int) -> Iterator[tuple[str, np.ndarray]]:
    """(path, panorama resized to height x 2 height) of each image of a folder, in natural name order."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)), key=natural_key)
    for name in names:
        path = str(Path(folder, name).resolve())
        with Image.open(path) as im:
            check_panorama(im.size, path)
            yield path, np.asarray(im.convert("RGB").resize((2 * height, height), Image.BILINEAR))


def video_frames(path: str, height: int, fps: float) -> Iterator[tuple[str, np.ndarray]]:
    """('video#t=SECONDS', panorama) of a video's frames sampled `fps` times a second (ffmpeg scales them)."""
    import imageio_ffmpeg

    path = str(Path(path).resolve())
    reader = imageio_ffmpeg.read_frames(path, output_params=["-vf", f"fps={fps},scale={2 * height}:{height}"])
    meta = next(reader)
    check_panorama(tuple(meta["source_size"]), path)
    for k, data in enumerate(reader):
        yield f"{path}#t={k / fps:.3f}", np.frombuffer(data, np.uint8).reshape(height, 2 * height, 3)


def capture_frames(path: str, height: int, fps: float) -> Iterator[tuple[str, np.ndarray]]:
    """(source URI, panorama) of every frame of a capture: a video or an image folder."""
    if os.path.isdir(path):
        return image_frames(path, height)
    return video_frames(path, height, fps)


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image near the horizon (the poles are stretched)."""
    h = STATS_HEIGHT
    grey = np.asarray(Image.fromarray(image).convert("L").resize((2 * h, h), Image.BILINEAR), np.float32)
    band = grey[h // 4 : 3 * h // 4]
    lap = 4 * band[1:-1, 1:-1] - band[:-2, 1:-1] - band[2:, 1:-1] - band[1:-1, :-2] - band[1:-1, 2:]
    return float(lap.var())


def thumbnail(image: np.ndarray) -> np.ndarray:
    """32 x 64 grey thumbnail (float32) for motion between frames."""
    return np.asarray(Image.fromarray(image).convert("L").resize((64, 32), Image.BOX), np.float32)


def select_frames(frames: Iterator[tuple[str, np.ndarray]], max_frames: int) -> Frames:
    """The sharp frames that moved since the last kept one, in order; ValueError past max_frames read."""
    read = []
    for uri, image in frames:
        if len(read) >= max_frames:
            raise ValueError(f"frames: the capture has over {max_frames} frames; lower --fps or raise --max-frames")
        read.append((uri, image, sharpness(image)))
    out = Frames(read=len(read))
    if not read:
        return out
    threshold = BLUR_RATIO * float(np.median([s for *_, s in read]))
    last = None
    for uri, image, sharp in read:
        if sharp < threshold:
            out.blurred += 1
            continue
        thumb = thumbnail(image)
        if last is not None and float(np.abs(thumb - last).mean()) < STILL_LEVELS:
            out.still += 1
            continue
        last = thumb
        out.images.append(image)
        out.sources.append(uri)
    return out
