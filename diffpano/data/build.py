"""What a procedural dataset build makes: its spec, its deterministic clip plan, and one scene's clips rendered."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from diffpano import storage
from diffpano.data.captions import CaptionModels, caption_frame
from diffpano.data.manifest import Clip, commit_clips, read_dataset
from diffpano.data.scene_mesh import SceneMeshRenderer
from diffpano.data.scenes import generate_scene
from diffpano.data.walks import clip_poses
from diffpano.geometry import check_panorama_size

SPEC_FILE = "dataset.json"
MAX_SIZE = 2048
PART_FRAMES = 256  # keyframes held in memory and committed together
# Fields that must match when a build resumes or grows an existing dataset.
FIXED_FIELDS = ("frames", "height", "width", "spacing", "seed", "depth")


@dataclass(frozen=True)
class BuildSpec:
    """A procedural dataset: N scenes x M clips x F keyframes of H x W, keyframes `spacing` metres apart."""

    scenes: int
    clips_per_scene: int
    frames: int
    height: int = 256
    width: int = 512
    spacing: float = 0.5
    seed: int = 0
    depth: bool = True
    face_size: int = 64
    captioner: str | None = None  # local BLIP2 directory; None: scene-graph captions
    summariser: str | None = None  # local LLM directory; None: template summaries

    def validate(self) -> BuildSpec:
        """Raise ValueError naming the field when a value is out of range."""
        for name, lo, hi in (("scenes", 1, 10**7), ("clips_per_scene", 1, 1000), ("frames", 1, 10000),
                             ("face_size", 16, 1024)):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"{name}: must be in [{lo}, {hi}], got {value}")
        check_panorama_size(self.height, self.width, field="size")
        if self.height > MAX_SIZE // 2:
            raise ValueError(f"size: at most {MAX_SIZE // 2}x{MAX_SIZE}, got {self.height}x{self.width}")
        if self.width % 2:
            raise ValueError(f"size: width must be even, got {self.width}")
        if not 0 < self.spacing <= 5:
            raise ValueError(f"spacing: keyframe spacing must be in (0, 5] metres, got {self.spacing}")
        return self


def scene_id(spec: BuildSpec, index: int) -> str:
    """Id of the spec's index-th scene."""
    return f"proc{spec.seed}-{index:06d}"


def clip_id(spec: BuildSpec, scene: int, clip: int) -> str:
    """Id of a clip: scene id and clip number, like HM3D's '00819-6D36GQHuP8H_0'."""
    return f"{scene_id(spec, scene)}_{clip}"


def scene_seed(spec: BuildSpec, index: int) -> int:
    """Seed of the index-th scene, independent of how many scenes are built."""
    return int(np.random.SeedSequence([spec.seed, index]).generate_state(1)[0])


def check_spec_file(out: str, spec, fixed: tuple[str, ...] = FIXED_FIELDS) -> None:
    """Write the spec (a dataclass) at a new output; at an existing one, require its `fixed` fields to match."""
    uri = storage.join(out, SPEC_FILE)
    if storage.exists(uri):
        old = json.loads(storage.read_bytes(uri))
        for name in fixed:
            if old.get(name) != getattr(spec, name):
                raise ValueError(
                    f"{name}: the dataset at {out} was built with {name}={old.get(name)!r}, got {getattr(spec, name)!r}"
                    " (use another --out, or the same value to resume or add scenes)"
                )
    storage.write_bytes(uri, json.dumps(asdict(spec), indent=2).encode())


def pending_clips(out: str, spec: BuildSpec) -> dict[int, list[int]]:
    """Clips of the plan that the output does not hold yet, by scene index."""
    done = set(read_dataset(out, ["clip_id"]).column("clip_id").to_pylist())
    plan: dict[int, list[int]] = {}
    for s in range(spec.scenes):
        missing = [c for c in range(spec.clips_per_scene) if clip_id(spec, s, c) not in done]
        if missing:
            plan[s] = missing
    return plan


def render_clips(spec: BuildSpec, scene_index: int, clips: list[int]) -> list[Clip]:
    """Keyframes, depth, poses and captions of some clips of one scene (deterministic)."""
    scene = generate_scene(scene_seed(spec, scene_index))
    renderer = SceneMeshRenderer(scene, threads=1)  # one scene per task or process: Embree on its one core
    models = CaptionModels(spec.captioner, spec.summariser)
    out = []
    for c in clips:
        rng = np.random.default_rng([spec.seed, scene_index, c])
        poses = clip_poses(scene, spec.frames, spec.spacing, rng)
        captioner, summariser = models.pair(int(rng.integers(2**31)))
        views = [renderer.render(p, spec.height, spec.width) for p in poses]
        captions = [caption_frame(renderer, p, captioner, summariser, spec.face_size)[0] for p in poses]
        out.append(Clip(
            scene_id=scene_id(spec, scene_index), clip_id=clip_id(spec, scene_index, c), captions=captions,
            poses=poses.astype(np.float32), rgb=np.stack([v.rgb for v in views]),
            depth=np.stack([v.depth for v in views]) if spec.depth else None,
        ))
    return out


def build_scene(spec: BuildSpec, scene_index: int, clips: list[int], out: str) -> dict:
    """Render some clips of one scene and commit them, a manifest part per PART_FRAMES keyframes; counts, seconds."""
    started = time.perf_counter()
    per_part = max(1, PART_FRAMES // spec.frames)
    for k in range(0, len(clips), per_part):
        commit_clips(out, render_clips(spec, scene_index, clips[k : k + per_part]))
    return {"scene": scene_index, "clips": len(clips), "frames": len(clips) * spec.frames,
            "seconds": time.perf_counter() - started}
