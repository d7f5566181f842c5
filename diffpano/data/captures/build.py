"""360-degree captures as a dataset source: the spec, and one capture turned into posed, captioned clips: frames,
the sharp moving ones reconstructed with COLMAP as a rig, poses put upright in metres, keyframes `spacing` apart, and
every clip of the capture committed at once (a capture is in the dataset whole, or not at all)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from diffpano.data.captions import CaptionModels, caption_panorama
from diffpano.data.captures.align import metric_poses
from diffpano.data.captures.frames import Frames, capture_frames, is_capture, select_frames
from diffpano.data.captures.sfm import Model, reconstruct
from diffpano.data.manifest import Clip, commit_clips, read_dataset
from diffpano.data.sources import Plan, SceneJob, SceneResult, SourceSpec, clip_id
from diffpano.defaults import MAX_PROMPT_CHARS, MAX_SEED

MIN_FRAMES = 3  # sharp, moving frames a capture needs before reconstruction is tried
SPACING_TOLERANCE = 0.95  # a step of 0.499 m still counts as 0.5 m: SfM scale is good to a fraction of a percent


class CaptureSpec(SourceSpec):
    """How captures become clips: SfM at sfm_height x 2 sfm_height, keyframes `spacing` metres apart in clips of
    `frames`, H x W panoramas, metric scale from `camera_height` (or an explicit `scale`)."""

    kind: ClassVar[str] = "capture"
    input_name: ClassVar[str] = "CAPTURES"
    fixed: ClassVar[tuple[str, ...]] = ("source", "frames", "height", "width", "sfm_height", "spacing",
                                        "camera_height", "scale", "fps", "seed")

    frames: int = Field(8, ge=2, le=10000, description="Keyframes per clip.")
    sfm_height: int = Field(512, ge=128, le=2048, description="Size the panoramas are reconstructed at (height)",
                            json_schema_extra={"size": True})
    camera_height: float = Field(1.6, ge=0.3, le=2.5, description="Lens height above the floor, metres: sets the "
                                 "metric scale.")
    scale: float | None = Field(None, gt=0, le=1e6, description="Metres per reconstruction unit, instead of "
                                "--camera-height.")
    fps: float = Field(2.0, ge=0.01, le=60.0, description="Video frames read per second.")
    max_frames: int = Field(600, ge=MIN_FRAMES, le=100000, description="Most frames read from one capture (held "
                            "in memory, 1.5 MB each at 512x1024).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the reconstruction and captions.")
    caption: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S",
                                description="Caption every keyframe with this text instead of the captioner -> "
                                "summariser stack.")
    source: Literal["capture"] = "capture"

    @model_validator(mode="after")
    def _captioned(self) -> CaptureSpec:
        stack = self.captioner or self.summariser
        if self.caption is not None and stack:
            raise ValueError("caption: give --caption TEXT or --captioner and --summariser, not both")
        if self.caption is None and not (self.captioner and self.summariser):
            raise ValueError("captions: captures carry no labels to caption from; pass --captioner BLIP2_DIR and "
                             "--summariser LLM_DIR, or --caption TEXT for one caption on every keyframe "
                             "(docs/captures.md)")
        return self

    @staticmethod
    def accepts(path: str) -> bool:
        """Whether a globbed path is a capture (a video, or a folder of panoramas)."""
        return is_capture(path)

    def plan(self, out: str, inputs: dict[str, str]) -> Plan:
        """The captures (scene id -> path) that out does not hold yet; a capture is in a dataset whole or not."""
        table = read_dataset(out, ["scene_id", "clip_id"])
        done = set(table.column("scene_id").to_pylist())
        jobs = [SceneJob(s, path) for s, path in inputs.items() if s not in done]
        return Plan(jobs, len(inputs), len(table.column("clip_id").unique()))

    def build_scene(self, job: SceneJob, out: str, result: SceneResult) -> None:
        """Reconstruct, caption and commit one capture's clips, counting its frames into result."""
        frames = select_frames(capture_frames(str(job.source), max(self.sfm_height, self.height), self.fps),
                               self.max_frames)
        result.counts = {"read": frames.read, "blurred": frames.blurred, "still": frames.still,
                         "kept": len(frames.images)}
        if len(frames.images) < MIN_FRAMES:
            raise ValueError(f"frames: {len(frames.images)} sharp, moving frames of {frames.read} read "
                             f"({frames.blurred} blurred, {frames.still} still); need at least {MIN_FRAMES}")
        clips, result.counts["registered"] = capture_clips(self, job.scene, frames, threads=1)
        caption_clips(self, clips)
        commit_clips(out, clips)
        result.clips, result.frames = len(clips), sum(len(c.rgb) for c in clips)


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
    keep = spaced(poses, spec.spacing)
    clips = []
    for k in range(0, len(keep), spec.frames):
        run = keep[k : k + spec.frames]
        if len(run) < 2:
            continue
        index = [model.frames[i] for i in run]
        clips.append(Clip(scene_id=scene, clip_id=clip_id(scene, first + len(clips)), captions=[],
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
        raise ValueError(f"keyframes: no reconstructed model holds two keyframes {spec.spacing} m apart; "
                         "lower --spacing")
    return clips, sum(len(m.frames) for m in models)


def caption_clips(spec: CaptureSpec, clips: list[Clip]) -> None:
    """Fill each clip's captions with --caption or the captioner -> summariser stack; ValueError (the capture's
    failure) for a caption the stack left empty, which would train on no text."""
    if spec.caption is not None:
        for clip in clips:
            clip.captions = [spec.caption.strip()] * len(clip.rgb)
        return
    captioner, summariser = CaptionModels(spec.captioner, spec.summariser).pair(spec.seed)
    for clip in clips:
        clip.captions = non_empty([caption_panorama(rgb, captioner, summariser, spec.face_size)[0]
                                   for rgb in clip.rgb], clip.clip_id)


def non_empty(captions: list[str], clip: str) -> list[str]:
    """The captions stripped; ValueError naming the first keyframe whose caption is empty."""
    captions = [c.strip() for c in captions]
    if empty := [i for i, c in enumerate(captions) if not c]:
        raise ValueError(f"captions: the captioner stack gave keyframe {empty[0]} of {clip} an empty caption; use "
                         "larger captioning models, or --caption TEXT")
    return captions
