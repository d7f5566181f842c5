"""What a mesh dataset render makes: its spec, scene ids from mesh paths, and one scene's clips rendered and
committed (walks over the walkable floor, equirectangular RGB and depth, captions), deterministic by seed."""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffpano.data.build import MAX_SIZE, PART_FRAMES
from diffpano.data.captions import CaptionModels
from diffpano.data.manifest import Clip, commit_clips, read_dataset
from diffpano.data.mesh import load_mesh, world_transform
from diffpano.data.mesh_captions import caption_mesh_frame
from diffpano.data.mesh_labels import attach_labels
from diffpano.data.raycast import MeshRenderer
from diffpano.data.walkable import FloorMap, floor_map, walk_poses
from diffpano.geometry import check_panorama_size

FIXED_FIELDS = ("source", "frames", "height", "width", "spacing", "seed", "depth", "camera_height", "clearance",
                "up", "unit_scale")


@dataclass(frozen=True)
class MeshSpec:
    """How each mesh becomes clips: M walks of F keyframes `spacing` metres apart at `camera_height`, H x W."""

    clips_per_scene: int = 2
    frames: int = 8
    height: int = 256
    width: int = 512
    spacing: float = 0.5
    camera_height: float = 1.5
    clearance: float = 0.3  # metres from walls and furniture
    seed: int = 0
    up: str = "y"  # the meshes' up axis (mesh.UP_AXES)
    unit_scale: float = 1.0  # metres per mesh unit
    depth: bool = True
    face_size: int = 64
    captioner: str | None = None  # local BLIP2 directory; None: captions from the mesh's semantic labels
    summariser: str | None = None  # local LLM directory; None: template summaries (needs labels)
    source: str = "mesh"

    def validate(self) -> MeshSpec:
        """Raise ValueError naming the field when a value is out of range."""
        for name, lo, hi in (("clips_per_scene", 1, 1000), ("frames", 1, 10000), ("face_size", 16, 1024)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name}: must be in [{lo}, {hi}], got {getattr(self, name)}")
        check_panorama_size(self.height, self.width, field="size")
        if self.height > MAX_SIZE // 2:
            raise ValueError(f"size: at most {MAX_SIZE // 2}x{MAX_SIZE}, got {self.height}x{self.width}")
        for name, lo, hi in (("spacing", 0.05, 5.0), ("camera_height", 0.3, 2.5), ("clearance", 0.05, 2.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name}: must be in [{lo}, {hi}] metres, got {value}")
        world_transform(self.up, self.unit_scale)
        return self


def scene_ids(paths: list[str], field: str = "meshes") -> dict[str, str]:
    """Scene id -> input path: the path below the inputs' common folder, without suffix, '/' as '-' (unique)."""
    if not paths:
        raise ValueError(f"{field}: no input files given (or the glob matched none)")
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    ids: dict[str, str] = {}
    for path in resolved:
        rel = path.relative_to(common).with_suffix("")
        sid = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(rel.parts))
        if sid in ids:
            raise ValueError(f"{field}: {path} given twice")
        ids[sid] = str(path)
    return ids


def clip_id(scene: str, clip: int) -> str:
    """Id of a clip: the scene id and the clip number, like HM3D's '00819-6D36GQHuP8H_0'."""
    return f"{scene}_{clip}"


def pending_mesh_clips(out: str, spec: MeshSpec, scenes: dict[str, str]) -> dict[str, list[int]]:
    """Clips of each scene that the output does not hold yet."""
    done = set(read_dataset(out, ["clip_id"]).column("clip_id").to_pylist())
    plan = {s: [c for c in range(spec.clips_per_scene) if clip_id(s, c) not in done] for s in scenes}
    return {s: c for s, c in plan.items() if c}


def caption_models(spec: MeshSpec, labelled: bool) -> CaptionModels:
    """The scene's captioner and summariser; ValueError saying what to pass when the mesh has no labels."""
    if not labelled and not (spec.captioner and spec.summariser):
        raise ValueError("captions: the mesh has no semantic labels (node or geometry names naming categories, "
                         "docs/meshes.md); pass --captioner BLIP2_DIR and --summariser LLM_DIR")
    return CaptionModels(spec.captioner, spec.summariser)


def prepare_scene(spec: MeshSpec, path: str, threads: int = 0) -> tuple[MeshRenderer, FloorMap]:
    """The mesh's renderer and walkable floor; ValueError naming what is wrong with the mesh."""
    mesh = attach_labels(load_mesh(path, spec.up, spec.unit_scale), path, spec.up, spec.unit_scale)
    renderer = MeshRenderer(mesh, threads)
    return renderer, floor_map(renderer, spec.camera_height, spec.clearance)


def render_mesh_clips(spec: MeshSpec, scene: str, renderer: MeshRenderer, floor: FloorMap,
                      clips: list[int]) -> list[Clip]:
    """Keyframes, depth, poses and captions of some clips of one mesh (deterministic by seed and scene id)."""
    mesh = renderer.mesh
    models = caption_models(spec, mesh.has_labels)
    key = int.from_bytes(hashlib.sha256(scene.encode()).digest()[:8], "little")
    out = []
    for c in clips:
        rng = np.random.default_rng([spec.seed, key, c])
        captioner, summariser = models.pair(int(rng.integers(2**31)))
        poses = walk_poses(floor, spec.frames, spec.spacing, rng)
        views = [renderer.render(p, spec.height, spec.width) for p in poses]
        captions = [caption_mesh_frame(renderer, p, captioner, summariser, spec.face_size)[0] for p in poses]
        out.append(Clip(scene_id=scene, clip_id=clip_id(scene, c), captions=captions, poses=poses.astype(np.float32),
                        rgb=np.stack([v.rgb for v in views]),
                        depth=np.stack([v.depth for v in views]) if spec.depth else None))
    return out


def build_mesh_scene(spec: MeshSpec, scene: str, path: str, clips: list[int], out: str, threads: int = 0) -> dict:
    """Render and commit some clips of one mesh; counts and seconds, or the scene's error (the job goes on)."""
    started = time.perf_counter()
    per_part = max(1, PART_FRAMES // spec.frames)
    try:
        renderer, floor = prepare_scene(spec, path, threads)
        for k in range(0, len(clips), per_part):
            part = render_mesh_clips(spec, scene, renderer, floor, clips[k : k + per_part])
            for clip in part:
                clip.sources = [path] * len(clip.rgb)
            commit_clips(out, part)
    except Exception as err:  # any bad mesh is this scene's failure, recorded; the other scenes go on
        return {"scene": scene, "path": path, "clips": 0, "frames": 0, "error": f"{type(err).__name__}: {err}",
                "seconds": time.perf_counter() - started}
    return {"scene": scene, "path": path, "clips": len(clips), "frames": len(clips) * spec.frames,
            "seconds": time.perf_counter() - started}

