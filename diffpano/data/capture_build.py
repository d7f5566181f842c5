"""What a capture dataset build makes: its spec, and one capture turned into posed, captioned clips: frames, the sharp
moving ones reconstructed with COLMAP as a rig, poses put upright in metres, keyframes `keyframe_spacing` apart, and
every clip of the capture committed at once (a capture is in the dataset whole, or not at all)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffpano.data.build import MAX_SIZE
from diffpano.data.captions import CaptionModels, caption_panorama
from diffpano.data.capture_align import metric_poses
from diffpano.data.capture_frames import Frames, capture_frames, select_frames
from diffpano.data.manifest import Clip, commit_clips, read_dataset
from diffpano.data.sfm import Model, reconstruct
from diffpano.geometry import check_panorama_size

FIXED_FIELDS = ("source", "frames", "height", "width", "sfm_height", "keyframe_spacing", "camera_height", "scale",
                "fps", "seed")
MIN_FRAMES = 3  # sharp, moving frames a capture needs before reconstruction is tried
SPACING_TOLERANCE = 0.95  # a step of 0.499 m still counts as 0.5 m: SfM scale is good to a fraction of a percent


@dataclass(frozen=True)
class CaptureSpec:
    """How captures become clips: SfM at sfm_height x 2 sfm_height, keyframes `keyframe_spacing` metres apart in
    clips of `frames`, H x W panoramas, metric scale from `camera_height` (or an explicit `scale`)."""

    frames: int = 8
    height: int = 256
    width: int = 512
    sfm_height: int = 512
    keyframe_spacing: float = 0.5
    camera_height: float = 1.6  # metres from the floor to the lens
    scale: float | None = None  # metres per reconstruction unit; None: from camera_height and the floor
    fps: float = 2.0  # video frames read per second
    max_frames: int = 600  # frames are held in memory, 1.5 MB each at 512x1024
    seed: int = 0
    face_size: int = 64
    captioner: str | None = None  # local BLIP2 directory
    summariser: str | None = None  # local LLM directory
    source: str = "capture"

    def validate(self) -> CaptureSpec:
        """Raise ValueError naming the field when a value is out of range."""
        for name, lo, hi in (("frames", 2, 10000), ("max_frames", MIN_FRAMES, 100000), ("face_size", 16, 1024),
                             ("sfm_height", 128, 2048)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name}: must be in [{lo}, {hi}], got {getattr(self, name)}")
        check_panorama_size(self.height, self.width, field="size")
        if self.height > MAX_SIZE // 2:
            raise ValueError(f"size: at most {MAX_SIZE // 2}x{MAX_SIZE}, got {self.height}x{self.width}")
        for name, lo, hi in (("keyframe_spacing", 0.05, 5.0), ("camera_height", 0.3, 2.5), ("fps", 0.01, 60.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name}: must be in [{lo}, {hi}], got {value}")
        if self.scale is not None and not (math.isfinite(self.scale) and 0 < self.scale <= 1e6):
            raise ValueError(f"scale: metres per reconstruction unit must be in (0, 1e6], got {self.scale}")
        if not (self.captioner and self.summariser):
            raise ValueError("captions: captures are captioned by the captioner -> summariser stack; pass "
                             "--captioner BLIP2_DIR and --summariser LLM_DIR (docs/captures.md)")
        return self


def pending_captures(out: str, scenes: dict[str, str]) -> tuple[dict[str, str], int]:
    """The captures (scene id -> path) that the output does not hold yet, and how many clips it holds."""
    table = read_dataset(out, ["scene_id", "clip_id"])
    done = set(table.column("scene_id").to_pylist())
    return {s: p for s, p in scenes.items() if s not in done}, len(table.column("clip_id").unique())


def spaced(poses: np.ndarray, spacing: float) -> list[int]:
    """Indices of keyframes in capture order, each about `spacing` metres or more from the previous one kept."""
    keep = [0]
    for i in range(1, len(poses)):
        if np.linalg.norm(poses[i, :3, 3] - poses[keep[-1], :3, 3]) >= SPACING_TOLERANCE * spacing:
            keep.append(i)
    return keep


def resized(image: np.ndarray, height: int) -> np.ndarray:
    """The panorama at height x 2 height."""
    if image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(image).resize((2 * height, height), Image.LANCZOS))


def model_clips(spec: CaptureSpec, scene: str, model: Model, frames: Frames, first: int) -> list[Clip]:
    """Clips of one reconstructed model: its spaced keyframes in runs of spec.frames (a last run of one is left)."""
    poses, _ = metric_poses(model.poses, model.points, spec.camera_height, spec.scale)
    keep = spaced(poses, spec.keyframe_spacing)
    clips = []
    for k in range(0, len(keep), spec.frames):
        run = keep[k : k + spec.frames]
        if len(run) < 2:
            continue
        index = [model.frames[i] for i in run]
        clips.append(Clip(scene_id=scene, clip_id=f"{scene}_{first + len(clips)}", captions=[],
                          poses=poses[run].astype(np.float32),
                          rgb=np.stack([resized(frames.images[i], spec.height) for i in index]),
                          sources=[frames.sources[i] for i in index]))
    return clips


def capture_clips(spec: CaptureSpec, scene: str, frames: Frames, threads: int = 1) -> tuple[list[Clip], int]:
    """The capture's clips with poses (captions still empty) and how many frames registered."""
    with tempfile.TemporaryDirectory(prefix="diffpano-sfm-") as work:
        sfm = [resized(image, spec.sfm_height) for image in frames.images]
        models = reconstruct(sfm, Path(work), threads, spec.seed)
    clips: list[Clip] = []
    for model in sorted(models, key=lambda m: m.frames[0]):
        clips += model_clips(spec, scene, model, frames, len(clips))
    if not clips:
        raise ValueError(f"keyframes: no reconstructed model holds two keyframes {spec.keyframe_spacing} m apart; "
                         "lower --keyframe-spacing")
    return clips, sum(len(m.frames) for m in models)


def caption_clips(spec: CaptureSpec, clips: list[Clip]) -> None:
    """Fill each clip's captions with the captioner -> summariser stack."""
    captioner, summariser = CaptionModels(spec.captioner, spec.summariser).pair(spec.seed)
    for clip in clips:
        clip.captions = [caption_panorama(rgb, captioner, summariser, spec.face_size)[0] for rgb in clip.rgb]


def build_capture(spec: CaptureSpec, scene: str, path: str, out: str, threads: int = 1) -> dict:
    """Reconstruct, caption and commit one capture's clips; counts and seconds, or the capture's error (the job
    goes on)."""
    started = time.perf_counter()
    result = {"scene": scene, "path": path, "clips": 0, "frames": 0}
    try:
        frames = select_frames(capture_frames(path, max(spec.sfm_height, spec.height), spec.fps), spec.max_frames)
        result["counts"] = {"read": frames.read, "blurred": frames.blurred, "still": frames.still,
                            "kept": len(frames.images)}
        if len(frames.images) < MIN_FRAMES:
            raise ValueError(f"frames: {len(frames.images)} sharp, moving frames of {frames.read} read "
                             f"({frames.blurred} blurred, {frames.still} still); need at least {MIN_FRAMES}")
        clips, registered = capture_clips(spec, scene, frames, threads)
        result["counts"]["registered"] = registered
        caption_clips(spec, clips)
        commit_clips(out, clips)
    except Exception as err:  # any bad capture is this capture's failure, recorded; the other captures go on
        return result | {"error": f"{type(err).__name__}: {err}", "seconds": time.perf_counter() - started}
    return result | {"clips": len(clips), "frames": sum(len(c.rgb) for c in clips),
                     "seconds": time.perf_counter() - started}
