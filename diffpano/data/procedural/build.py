"""Procedural scenes as a dataset source: the spec, its deterministic clip plan, and one scene's clips rendered."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from diffpano.data import sources
from diffpano.data.captions import CaptionModels, caption_frame
from diffpano.data.manifest import Clip
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import generate_scene
from diffpano.data.procedural.walks import clip_poses
from diffpano.data.sources import Plan, SceneJob, SceneResult, SourceSpec, clip_plan, commit_in_parts


class ProceduralSpec(SourceSpec):
    """A procedural dataset: N scenes x M clips x F keyframes of H x W, keyframes `spacing` metres apart."""

    kind: ClassVar[str] = "build"
    fixed: ClassVar[tuple[str, ...]] = ("frames", "height", "width", "spacing", "seed", "depth")

    scenes: int = Field(8, ge=1, le=10**7, description="Number of procedural scenes.")
    clips_per_scene: int = Field(2, ge=1, le=1000, description="Walks (clips) per scene.")
    depth: bool = Field(True, description="Write depth panoramas.")
    captioner: str | None = Field(None, description="Local BLIP2 directory; default: scene-graph captions.")
    summariser: str | None = Field(None, description="Local LLM directory; default: template summaries.")

    def plan(self, out: str, inputs: dict[str, str] | None = None) -> Plan:
        """Clips of the spec's scenes that out does not hold yet (procedural scenes take no inputs)."""
        return clip_plan(out, {scene_id(self, s): s for s in range(self.scenes)}, self.clips_per_scene)

    def build_scene(self, job: SceneJob, out: str, result: SceneResult) -> None:
        """Render the job's clips and commit them, a manifest part per PART_FRAMES keyframes."""
        commit_in_parts(out, job, self.frames, lambda clips: render_clips(self, int(job.source), clips), result)


def scene_id(spec: ProceduralSpec, index: int) -> str:
    """Id of the spec's index-th scene."""
    return f"proc{spec.seed}-{index:06d}"


def clip_id(spec: ProceduralSpec, scene: int, clip: int) -> str:
    """Id of a clip of the spec's scene-th scene."""
    return sources.clip_id(scene_id(spec, scene), clip)


def scene_seed(spec: ProceduralSpec, index: int) -> int:
    """Seed of the index-th scene, independent of how many scenes are built."""
    return int(np.random.SeedSequence([spec.seed, index]).generate_state(1)[0])


def render_clips(spec: ProceduralSpec, scene_index: int, clips: list[int]) -> list[Clip]:
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
