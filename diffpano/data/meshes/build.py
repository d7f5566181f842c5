"""Textured meshes as a dataset source: the spec, scene ids from mesh paths, and one mesh's clips rendered and
committed (walks over the walkable floor, equirectangular RGB and depth, captions), deterministic by seed."""

from __future__ import annotations

import hashlib
import os
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from diffpano.data.captions import CaptionModels
from diffpano.data.manifest import Clip
from diffpano.data.meshes.captions import caption_mesh_frame
from diffpano.data.meshes.labels import attach_labels
from diffpano.data.meshes.mesh import MESH_SUFFIXES, UP_AXES, load_mesh
from diffpano.data.meshes.raycast import MeshRenderer
from diffpano.data.meshes.walkable import FloorMap, floor_map, walk_poses
from diffpano.data.sources import Plan, SceneJob, SceneResult, SourceSpec, clip_id, clip_plan, commit_in_parts
from diffpano.defaults import MAX_SEED

UpAxis = Literal[tuple(UP_AXES)]


class MeshSpec(SourceSpec):
    """How each mesh becomes clips: M walks of F keyframes `spacing` metres apart at `camera_height`, H x W."""

    kind: ClassVar[str] = "render"
    input_name: ClassVar[str] = "MESHES"
    fixed: ClassVar[tuple[str, ...]] = ("source", "frames", "height", "width", "spacing", "seed", "depth",
                                        "camera_height", "clearance", "up", "unit_scale")

    clips_per_scene: int = Field(2, ge=1, le=1000, description="Walks (clips) per mesh.")
    camera_height: float = Field(1.5, ge=0.3, le=2.5, description="Eye height above the floor, metres.")
    clearance: float = Field(0.3, ge=0.05, le=2.0, description="Metres kept from walls and furniture.")
    up: UpAxis = Field("y", description="The meshes' up axis: y (glTF, HM3D, 3D-FRONT), z (Matterport3D, ScanNet, "
                       "Replica) or -y (already this project's frame).")
    unit_scale: float = Field(1.0, ge=1e-4, le=1e4, description="Metres per mesh unit (0.01 for centimetres).")
    depth: bool = Field(True, description="Write depth panoramas.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the walks and captions.")
    captioner: str | None = Field(None, description="Local BLIP2 directory for face captions (needed, with "
                                  "--summariser, for meshes without semantic labels).")
    summariser: str | None = Field(None, description="Local LLM directory to merge captions.")
    source: Literal["mesh"] = "mesh"

    @staticmethod
    def accepts(path: str) -> bool:
        """Whether a globbed file is a mesh (not a texture, MTL or semantic sidecar)."""
        base = os.path.basename(path).lower()
        return base.endswith(MESH_SUFFIXES) and ".semantic." not in base and not base.endswith("_semantic.ply")

    def plan(self, out: str, inputs: dict[str, str]) -> Plan:
        """Clips of each mesh (scene id -> path) that out does not hold yet."""
        return clip_plan(out, inputs, self.clips_per_scene)

    def build_scene(self, job: SceneJob, out: str, result: SceneResult) -> None:
        """Render and commit the job's clips of one mesh, a manifest part per PART_FRAMES keyframes."""
        renderer, floor = prepare_scene(self, str(job.source), threads=1)  # a scene per task: Embree on its CPU

        def render(clips: list[int]) -> list[Clip]:
            part = render_mesh_clips(self, job.scene, renderer, floor, clips)
            for clip in part:
                clip.sources = [str(job.source)] * len(clip.rgb)
            return part

        commit_in_parts(out, job, self.frames, render, result)


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
