"""Tour specs: what one tour is made of (text, cameras, sampling settings), bounded and strict.

The same rules serve the HTTP API's bodies (docs/http-api.md) and the rows of bulk spec files (docs/bulk-specs.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from diffpano.defaults import DEFAULT_VIEWS, MAX_PROMPT_CHARS, MAX_SEED, MAX_SPEC_STEPS, MAX_SPEC_VIEWS
from diffpano.geometry.spherical import validate_poses
from diffpano.geometry.trajectories import named_trajectory, trajectory_params
from diffpano.io import storage
from diffpano.pipelines.given import MAX_INLINE_IMAGE_BYTES, check_views, is_inline
from diffpano.pipelines.schedulers import SCHEDULER_NAMES

MAX_GUIDANCE = 30.0
ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"  # tour and job ids

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS, strip_whitespace=True)]
Pose = Annotated[list[float], Field(min_length=16, max_length=16)]


LORA_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # a LoRA under a root is named, never given as a path


class Strict(BaseModel):
    """Unknown fields and non-finite numbers (NaN, Infinity, 1e400) are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Trajectory(BaseModel):
    """A named trajectory with its parameters (walk: spacing, turn_deg, heading_deg; orbit: radius, arc_deg)."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["walk", "orbit"]

    @model_validator(mode="after")
    def _params(self) -> Trajectory:
        """Known parameters, finite and in range (an error at `trajectory`)."""
        trajectory_params(self.kind, self.model_extra)
        return self

    def poses(self, num_views: int) -> np.ndarray:
        """(N, 4, 4) poses; ValueError names a bad parameter."""
        return named_trajectory(self.kind, num_views, dict(self.model_extra or {})).numpy()


class Sampling(Strict):
    """Sampler settings of a tour; None means the library's default (diffpano.defaults) or, for seed, a random one."""

    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_SPEC_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    height: int | None = Field(None, ge=8, le=4096)
    width: int | None = Field(None, ge=16, le=8192)
    scheduler: Literal[SCHEDULER_NAMES] | None = None  # None: the model's own (its scheduler/ config)
    lora: str | None = Field(None, pattern=f"^{LORA_NAME}$")  # a LoRA by name, under the generator's LoRA root


class TourSpec(Sampling):
    """One tour: one prompt or one per view, explicit poses or a named trajectory (walk by default)."""

    prompt: Prompt | None = None
    prompts: list[Prompt] | None = Field(None, min_length=1, max_length=MAX_SPEC_VIEWS)
    num_views: int | None = Field(None, ge=1, le=MAX_SPEC_VIEWS)
    poses: list[Pose] | None = Field(None, min_length=1, max_length=MAX_SPEC_VIEWS)
    trajectory: Trajectory | None = None
    # view index -> your own panorama for that view (image-to-tour): a data:image/png|jpeg;base64 URI, or (bulk
    # specs) an s3:// URI or an absolute path
    images: dict[int, str] | None = Field(None, min_length=1, max_length=MAX_SPEC_VIEWS)
    # a geometry the tour is made on (docs/guide/generate.md): a mesh (y up, metres: glTF's convention) by an s3://
    # URI or an absolute path, or a procedural house laid out as the prompt says; strength as `generate --strength`
    mesh_uri: str | None = Field(None, min_length=2, max_length=1024, pattern=r"^(s3://|/)")
    layout: bool = False
    strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("images")
    @classmethod
    def _image_sources(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        """Each given panorama inline (bounded) or named by an s3:// URI or an absolute path."""
        for index, value in (v or {}).items():
            if not is_inline(value) and not (value.startswith(("s3://", "/")) and len(value) <= 1024):
                raise ValueError(f"images.{index}: a data:image/png;base64,... URI, an s3:// URI or an absolute path")
            if is_inline(value) and len(value) > MAX_INLINE_IMAGE_BYTES * 4 // 3 + 64:
                raise ValueError(f"images.{index}: an inline image may hold at most {MAX_INLINE_IMAGE_BYTES >> 20} MiB")
        return v

    @field_validator("poses")
    @classmethod
    def _valid_poses(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        """Last row (0, 0, 0, 1), R a rotation (docs/geometry.md); finiteness is checked per number before."""
        if v is not None:
            validate_poses(np.asarray(v, dtype=np.float64).reshape(-1, 4, 4), field="poses")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TourSpec:
        """Exactly one of prompt/prompts, at most one of poses/trajectory, and one view count for all of them."""
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("prompt/prompts: give exactly one of them")
        if self.poses is not None and self.trajectory is not None:
            raise ValueError("poses/trajectory: give at most one of them")
        counts = {name: n for name, n in (("num_views", self.num_views),
                                          ("prompts", len(self.prompts) if self.prompts else None),
                                          ("poses", len(self.poses) if self.poses else None)) if n is not None}
        if len(set(counts.values())) > 1:
            raise ValueError(f"num_views/prompts/poses: view counts disagree: {counts}")
        check_views(self.images or {}, self.view_count(), "images")
        self.pose_array()  # trajectory parameters are checked here
        if self.mesh_uri is not None and self.layout:
            raise ValueError("mesh_uri/layout: give at most one of them")
        if self.strength is not None and not self.has_geometry():
            raise ValueError("strength: only with mesh_uri or layout")
        if self.layout and (self.poses is not None or self.trajectory is not None):
            raise ValueError("layout: the tour walks through the house it lays out; poses/trajectory need mesh_uri")
        return self

    def has_geometry(self) -> bool:
        """Whether the tour is made on a geometry (a mesh or a laid-out house)."""
        return self.mesh_uri is not None or self.layout

    def view_count(self) -> int:
        """Number of views of the tour."""
        if self.poses:
            return len(self.poses)
        if self.prompts:
            return len(self.prompts)
        return self.num_views or DEFAULT_VIEWS

    def pose_array(self) -> np.ndarray:
        """(N, 4, 4) poses: explicit, from the trajectory, or a walk."""
        n = self.view_count()
        if self.poses is not None:
            return np.asarray(self.poses, dtype=np.float64).reshape(n, 4, 4)
        return (self.trajectory or Trajectory(kind="walk")).poses(n)

    def prompt_list(self) -> list[str]:
        """One prompt per view."""
        return list(self.prompts) if self.prompts else [self.prompt] * self.view_count()


class BulkSpec(TourSpec):
    """One tour of a bulk job: a tour spec with a unique tour_id."""

    tour_id: str = Field(pattern=ID_PATTERN)


@dataclass
class SpecError:
    """A spec that failed validation: its line (1-based) and what is wrong."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


SPEC_CHUNK_BYTES = 4 << 20  # JSONL specs are read this much at a time (each read waits out a storage outage)


def iter_spec_rows(uri: str) -> Iterator[dict]:
    """Rows of a JSONL or Parquet spec file (local or s3://), read a chunk at a time; ValueError names a line that
    is not JSON."""
    if uri.endswith(".parquet"):
        for group in range(storage.parquet_row_groups(uri)):
            yield from storage.read_row_group(uri, group).to_pylist()
        return
    n, tail, offset = 0, b"", 0
    while chunk := storage.read_range(uri, offset, SPEC_CHUNK_BYTES):
        offset += len(chunk)
        *lines, tail = (tail + chunk).split(b"\n")
        for line in lines:
            n += 1
            yield from _json_row(line, n)
    yield from _json_row(tail, n + 1)


def _json_row(line: bytes, n: int) -> list[dict]:
    """The row of one JSONL line ([] for a blank one)."""
    if not line.strip():
        return []
    try:
        return [json.loads(line)]
    except json.JSONDecodeError as err:
        raise ValueError(f"specs: line {n}: not valid JSON ({err.msg})") from None


def read_spec_rows(uri: str) -> list[dict]:
    """All rows of a spec file (for small ones: an HTTP job's specs_uri)."""
    return list(iter_spec_rows(uri))


def _first_error(err: ValidationError) -> tuple[str, str]:
    """The field (dotted path, "spec" for the whole) and message of a validation error's first problem."""
    first = err.errors()[0]
    return ".".join(str(p) for p in first["loc"]) or "spec", first["msg"].removeprefix("Value error, ")


def error_line(err: ValidationError) -> str:
    """'field: message' of a validation error's first problem (a model-level message names its own field)."""
    where, message = _first_error(err)
    return message if where == "spec" else f"{where}: {message}"


def given_fields(row: dict) -> dict:
    """A spec row without its absent fields (Parquet rows carry every column, None where a spec has none)."""
    return {k: v for k, v in row.items() if v is not None}


def check_rows(rows: Iterable[Any]) -> Iterator[BulkSpec | SpecError]:
    """Each row as a spec that passes the rules or as the error that it does not (a repeated tour_id is one)."""
    seen = set()
    for n, row in enumerate(rows, 1):
        if isinstance(row, dict):
            row = given_fields(row)
        try:
            spec = BulkSpec.model_validate(row)
        except ValidationError as err:
            yield SpecError(n, *_first_error(err))
            continue
        if spec.tour_id in seen:
            yield SpecError(n, "tour_id", f"duplicate tour_id {spec.tour_id!r}")
            continue
        seen.add(spec.tour_id)
        yield spec


def validate_specs(rows: Iterable[Any]) -> tuple[list[BulkSpec], list[SpecError]]:
    """Specs that pass the rules, and an error per row that does not (duplicate ids included)."""
    checked = list(check_rows(rows))
    return [s for s in checked if isinstance(s, BulkSpec)], [e for e in checked if isinstance(e, SpecError)]


class SpecRows:
    """The valid specs of a source of rows (a spec file, synthetic specs), read again each time they are iterated
    rather than held: checked once up front, keeping only their tour ids and the errors."""

    def __init__(self, rows: Callable[[], Iterable[Any]]) -> None:
        self.rows, self.ids, self.invalid = rows, [], []
        for checked in check_rows(rows()):
            if isinstance(checked, SpecError):
                self.invalid.append(checked)
            else:
                self.ids.append(checked.tour_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[BulkSpec]:
        return (s for s in check_rows(self.rows()) if isinstance(s, BulkSpec))

    def json_rows(self) -> Iterator[tuple[str, str]]:
        """(tour_id, the row as JSON) of each valid row, without validating it again (whoever runs it does)."""
        skip = {e.line for e in self.invalid}
        for n, row in enumerate(self.rows(), 1):
            if n not in skip:
                row = given_fields(row)
                yield row["tour_id"], json.dumps(row)


def synthetic_specs(count: int, views: int = DEFAULT_VIEWS, seed: int = 0, steps: int | None = None) -> Iterator[dict]:
    """Specs of walks through procedural scenes, from room to room, with each view's own caption, one at a time."""
    from diffpano.data.procedural.build import ProceduralSpec, render_clips

    spec = ProceduralSpec(scenes=count, clips_per_scene=1, frames=views, height=16, width=32, seed=seed, depth=False,
                          face_size=16)
    for i in range(count):
        clip = render_clips(spec, i, [0])[0]
        yield ({"tour_id": f"synthetic-{seed}-{i:06d}", "prompts": list(clip.captions),
                "poses": [p.reshape(16).tolist() for p in clip.poses], "seed": seed * 1_000_003 + i}
               | ({"num_inference_steps": steps} if steps else {}))
