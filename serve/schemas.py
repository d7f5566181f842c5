"""Bodies of the HTTP API (docs/http-api.md), also the rows of bulk specs (docs/bulk-specs.md): bounded, strict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from diffpano.geometry import validate_poses
from diffpano.trajectories import named_trajectory, trajectory_params

MAX_PROMPT_CHARS = 1000
MAX_VIEWS = 16
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1
DEFAULT_VIEWS = 4

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS, strip_whitespace=True)]
Pose = Annotated[list[float], Field(min_length=16, max_length=16)]


class Strict(BaseModel):
    """Unknown fields and non-finite numbers (NaN, Infinity, 1e400) are refused (422)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Trajectory(BaseModel):
    """A named trajectory with its parameters (walk: spacing, turn_deg, heading_deg; orbit: radius, arc_deg)."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["walk", "orbit"]

    @model_validator(mode="after")
    def _params(self) -> Trajectory:
        """Known parameters, finite and in range (422 at `trajectory`)."""
        trajectory_params(self.kind, self.model_extra)
        return self

    def poses(self, num_views: int) -> np.ndarray:
        """(N, 4, 4) poses; ValueError names a bad parameter."""
        return named_trajectory(self.kind, num_views, dict(self.model_extra or {})).numpy()


class Sampling(Strict):
    """Settings every generation request shares."""

    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    height: int | None = Field(None, ge=8, le=4096)
    width: int | None = Field(None, ge=16, le=8192)
    output: Literal["inline", "store"] = "inline"


class PanoramaRequest(Sampling):
    """POST /v1/panoramas: one prompt, one panorama."""

    prompt: Prompt


class TourRequest(Sampling):
    """POST /v1/tours: one prompt or one per view, explicit poses or a named trajectory (walk by default)."""

    prompt: Prompt | None = None
    prompts: list[Prompt] | None = Field(None, min_length=1, max_length=MAX_VIEWS)
    num_views: int | None = Field(None, ge=1, le=MAX_VIEWS)
    poses: list[Pose] | None = Field(None, min_length=1, max_length=MAX_VIEWS)
    trajectory: Trajectory | None = None

    @field_validator("poses")
    @classmethod
    def _valid_poses(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        """Last row (0, 0, 0, 1), R a rotation (docs/geometry.md); finiteness is checked per number before."""
        if v is not None:
            validate_poses(np.asarray(v, dtype=np.float64).reshape(-1, 4, 4), field="poses")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TourRequest:
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
        self.pose_array()  # trajectory parameters are checked here, answered with 422
        return self

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


class View(BaseModel):
    """One view of a generated tour."""

    view_index: int
    prompt: str
    pose_c2w: list[float]
    height: int
    width: int
    image_png_base64: str | None = None
    image_uri: str | None = None


class TourResponse(BaseModel):
    """200 of POST /v1/tours."""

    tour_id: str
    model: str
    views: list[View]
    manifest_uri: str | None = None


class GenerationJob(BaseModel):
    """What the ingress asks of a model replica: one tour, its settings resolved."""

    tour_id: str
    prompts: list[str]
    poses: list[list[float]]
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int | None
    width: int | None
    store_root: str | None = None

    def views(self) -> int:
        """Number of views (what batching counts)."""
        return len(self.prompts)


class GenerationResult(BaseModel):
    """A model replica's answer: PNG bytes per view (or stored URIs) and how the tour was made."""

    tour_id: str
    model: str
    seed: int
    height: int
    width: int
    pngs: list[bytes]
    image_uris: list[str] | None = None
    manifest_uri: str | None = None


def error_detail(field: str, message: str) -> list[dict[str, Any]]:
    """A FastAPI-style 422 detail naming the field."""
    return [{"loc": ["body", field], "msg": message, "type": "value_error"}]


def validation_detail(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic errors as a JSON-safe 422 detail: where, what rule, which kind; never the input itself."""
    return [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
             "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", "value_error"))} for e in errors]
