"""What every dataset source is (procedural scenes, meshes, captures): a validated spec that plans the scenes an
output still lacks and builds one scene into committed clips; a scene that fails is a result with its error."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import ConfigDict, Field, field_validator, model_validator

from diffpano.data.manifest import Clip, commit_clips, read_dataset
from diffpano.defaults import MAX_SEED
from diffpano.geometry.spherical import check_panorama_size
from diffpano.io import storage
from diffpano.specs import Strict

SPEC_FILE = "dataset.json"
MAX_SIZE = 2048  # panorama width
PART_FRAMES = 256  # keyframes held in memory and committed together


@dataclass(frozen=True)
class SceneJob:
    """One scene to build: its id, its input (a mesh or capture path, a procedural scene's index), its clips."""

    scene: str
    source: str | int
    clips: tuple[int, ...] = ()  # clip numbers to render; () for a capture, which is built whole


@dataclass
class SceneResult:
    """What building one scene did; `error` set when it failed (the job goes on with the other scenes)."""

    scene: str
    source: str | int
    clips: int = 0
    frames: int = 0
    seconds: float = 0.0
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # what the source counts (captures: frames read, ...)


@dataclass
class Plan:
    """The scenes an output still lacks, of how many, and how many clips it already holds."""

    jobs: list[SceneJob]
    scenes: int
    clips_present: int


class SourceSpec(Strict):
    """Clips of `frames` keyframes `spacing` metres apart as height x width panoramas, captioned; the fields every
    source shares. Subclasses add theirs and say what is pending and how one scene is built."""

    model_config = ConfigDict(frozen=True)
    kind: ClassVar[str]  # the progress bar's label and the failure files' prefix
    fixed: ClassVar[tuple[str, ...]]  # fields that must match when a build resumes or grows an output
    input_name: ClassVar[str] = ""  # what the input files are called (MESHES); "" for a source that takes none

    frames: int = Field(8, ge=1, le=10000, description="Keyframes per clip.")
    height: int = Field(256, ge=1, le=MAX_SIZE // 2, description="Size of the panoramas (height)",
                        json_schema_extra={"size": True})
    width: int = Field(512, ge=2, le=MAX_SIZE, description="Panorama width.")
    spacing: float = Field(0.5, ge=0.05, le=5.0, description="Metres between keyframes.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the whole dataset.")
    face_size: int = Field(64, ge=16, le=1024, description="Cube-face size the captioner sees.")
    captioner: str | None = Field(None, description="Local BLIP2 directory for face captions.")
    summariser: str | None = Field(None, description="Local LLM directory to merge captions.")

    @model_validator(mode="after")
    def _panorama(self) -> SourceSpec:
        check_panorama_size(self.height, self.width, field="size")
        return self

    @field_validator("captioner", "summariser")
    @classmethod
    def _local_directory(cls, path: str | None) -> str | None:
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"must be a local model directory, got {path!r} (no such directory)")
        return path

    @staticmethod
    def accepts(path: str) -> bool:
        """Whether a file a glob matched is one of this source's inputs."""
        return True

    def plan(self, out: str, inputs: dict[str, str]) -> Plan:
        """The scenes (inputs: scene id -> path) whose clips out does not hold yet."""
        raise NotImplementedError

    def build_scene(self, job: SceneJob, out: str, result: SceneResult) -> None:
        """Build and commit the job's clips, counting them into result; raise on failure."""
        raise NotImplementedError


def clip_id(scene: str, clip: int) -> str:
    """Id of a clip: the scene id and the clip number, like HM3D's '00819-6D36GQHuP8H_0'."""
    return f"{scene}_{clip}"


def clip_plan(out: str, scenes: dict[str, str | int], clips_per_scene: int) -> Plan:
    """For sources of clips_per_scene walks a scene: the clips of each scene (id -> source) that out lacks."""
    done = set(read_dataset(out, ["clip_id"]).column("clip_id").to_pylist())
    jobs = [SceneJob(s, source, tuple(c for c in range(clips_per_scene) if clip_id(s, c) not in done))
            for s, source in scenes.items()]
    jobs = [j for j in jobs if j.clips]
    return Plan(jobs, len(scenes), len(scenes) * clips_per_scene - sum(len(j.clips) for j in jobs))


def commit_in_parts(out: str, job: SceneJob, frames: int, render: Callable[[list[int]], list[Clip]],
                    result: SceneResult) -> None:
    """Render the job's clips and commit them, a manifest part per PART_FRAMES keyframes, counting them in result."""
    per_part = max(1, PART_FRAMES // frames)
    for k in range(0, len(job.clips), per_part):
        part = render(list(job.clips[k : k + per_part]))
        commit_clips(out, part)
        result.clips += len(part)
        result.frames += len(part) * frames


def run_scene(spec: SourceSpec, job: SceneJob, out: str) -> SceneResult:
    """Build one scene; any error is the scene's failure, recorded in its result (the other scenes go on)."""
    started, result = time.perf_counter(), SceneResult(job.scene, job.source)
    try:
        spec.build_scene(job, out, result)
    except Exception as err:  # a bad mesh, a capture that does not reconstruct, a crash in a captioner
        result.clips = result.frames = 0
        result.error = f"{type(err).__name__}: {err}"
    result.seconds = time.perf_counter() - started
    return result


def scene_ids(paths: list[str], field: str) -> dict[str, str]:
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


def check_spec_file(out: str, spec: SourceSpec) -> None:
    """Write the spec at a new output; at an existing one, require its fixed fields to match."""
    uri = storage.join(out, SPEC_FILE)
    if storage.exists(uri):
        old = json.loads(storage.read_bytes(uri))
        for name in spec.fixed:
            if old.get(name) != getattr(spec, name):
                raise ValueError(
                    f"{name}: the dataset at {out} was built with {name}={old.get(name)!r}, got {getattr(spec, name)!r}"
                    " (use another --out, or the same value to resume or add scenes)"
                )
    storage.write_bytes(uri, json.dumps(spec.model_dump(mode="json"), indent=2).encode())
