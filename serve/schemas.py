"""Bodies of the HTTP API (docs/http-api.md): requests build on the tour specs (diffpano.specs); no Ray here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from diffpano.pipelines.given import is_inline
from diffpano.specs import BulkSpec, Prompt, Sampling, Strict, TourSpec

MAX_INLINE_SPECS = 10_000
PREFIX = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_./-]{0,255}$")

Output = Literal["inline", "store"]
WebhookEvent = Literal["start", "progress", "completed"]
State = Literal["queued", "running", "done", "failed", "cancelled"]


class PanoramaRequest(Sampling):
    """POST /v1/panoramas: one prompt, one panorama."""

    prompt: Prompt
    output: Output = "inline"
    stream: bool = False  # answer text/event-stream: progress at every step, then the tour (docs/http-api.md)


class TourRequest(TourSpec):
    """POST /v1/tours: a tour spec, answered inline or stored under the server's output root."""

    output: Output = "inline"
    stream: bool = False


class JobRequest(Strict):
    """POST /v1/jobs: specs inline or a specs URI, and a prefix under the server's output root."""

    specs: list[dict] | None = Field(None, min_length=1, max_length=MAX_INLINE_SPECS)
    specs_uri: str | None = Field(None, max_length=1024)
    output: str | None = Field(None, max_length=256)
    webhook: str | None = Field(None, max_length=2048)  # an http(s) URL on a host the server allows (webhook_allow)
    webhook_events: list[WebhookEvent] | None = Field(None, min_length=1, max_length=3)  # None: all of them

    @field_validator("output")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        """A relative prefix without '..': the job writes below the server's root only."""
        if v is not None and (not PREFIX.match(v) or ".." in v.split("/")):
            raise ValueError("output: a relative prefix of letters, digits, '-', '_', '.', '/' without '..'")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        """Exactly one of specs/specs_uri."""
        if (self.specs is None) == (self.specs_uri is None):
            raise ValueError("specs/specs_uri: give exactly one of them")
        return self


class JobStatus(BaseModel):
    """A job as GET /v1/jobs/{id} reports it."""

    job_id: str
    state: State
    tours_total: int
    tours_done: int
    tours_failed: int
    tours_running: int  # generating now; after a cancel, 0 means the job has stopped writing
    manifest_uri: str
    webhook_failures: int | None = None  # webhook delivery attempts that got no 2xx; None without a webhook


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
    seed: int | None = None  # with the model and the sampler, what reproduces the tour
    scheduler: str | None = None  # the sampler's name (docs/tours.md); None for tours stored before it was recorded
    views: list[View]
    manifest_uri: str | None = None


class GenerationJob(BulkSpec):
    """What the ingress asks of a model replica: one tour with its seed and size resolved, stored when store_root."""

    store_root: str | None = None


class GenerationResult(BaseModel):
    """A model replica's answer: PNG bytes per view (or stored URIs) and how the tour was made."""

    tour_id: str
    model: str
    seed: int
    scheduler: str | None = None
    height: int
    width: int
    pngs: list[bytes]
    poses: list[list[float]] | None = None  # camera-to-world (16 numbers) of each view, as generated
    image_uris: list[str] | None = None
    manifest_uri: str | None = None


class Progress(BaseModel):
    """A streamed tour's step: UNet calls done of all, and at a few steps a preview PNG of view 0's clean estimate."""

    tour_id: str
    step: int
    steps: int
    preview_png: bytes | None = None


def inline_only(images: dict[int, str] | None) -> tuple[str, str] | None:
    """(field, why) of the first given panorama that is not inline: over HTTP a server reads no file a request names."""
    for index, value in sorted((images or {}).items()):
        if not is_inline(value):
            return f"images.{index}", "the HTTP API takes panoramas inline only: data:image/png;base64,... or " \
                                      "data:image/jpeg;base64,..."
    return None


def error_detail(field: str, message: str) -> list[dict[str, Any]]:
    """A FastAPI-style 422 detail naming the field."""
    return [{"loc": ["body", field], "msg": message, "type": "value_error"}]


def validation_detail(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic errors as a JSON-safe 422 detail: where, what rule, which kind; never the input itself."""
    return [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
             "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", "value_error"))} for e in errors]
