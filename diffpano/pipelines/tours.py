"""Tour specs into tours: the one path from specs to Tour records that the model deployment, offline and online bulk
jobs and evaluation all take, with the bookkeeping they share (what is already done, what failed)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from diffpano.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, GEOMETRY_STRENGTH, random_seed
from diffpano.io import storage
from diffpano.io.manifest import Tour, tour_ids
from diffpano.pipelines.given import known_views, read_given
from diffpano.specs import BulkSpec

if TYPE_CHECKING:
    from diffpano.models.lora import LoraSet


class Proxy(Protocol):
    """A tour's geometry as the pipeline uses it (diffpano.data.proxy.Proxy): poses, renders and their depth."""

    poses: np.ndarray  # (N, 4, 4)
    rgb: np.ndarray  # (N, H, W, 3) uint8
    depth: np.ndarray  # (N, H, W) metres


class Settings(NamedTuple):
    """What tours generated in one pipeline call must share."""

    views: int
    height: int | None
    width: int | None
    steps: int
    guidance: float
    scheduler: str | None
    given_views: tuple[int, ...]
    lora: str | None
    strength: float | None  # None: no geometry; else the img2img strength from the tour's geometry


def settings(spec: BulkSpec) -> Settings:
    """The spec's Settings, the library's defaults filled in."""
    steps = spec.num_inference_steps or DEFAULT_STEPS
    guidance = DEFAULT_GUIDANCE if spec.guidance_scale is None else spec.guidance_scale
    strength = (GEOMETRY_STRENGTH if spec.strength is None else spec.strength) if spec.has_geometry() else None
    return Settings(spec.view_count(), spec.height, spec.width, steps, guidance, spec.scheduler,
                    tuple(sorted(spec.images or {})), spec.lora, strength)


Geometry = Callable[[BulkSpec, int, int, int], Proxy]  # (spec, seed, height, width) -> its proxy (diffpano.data)


def make_tours(pipe, specs: Sequence[BulkSpec], loras: LoraSet | None = None, geometry: Geometry | None = None,
               **options) -> dict[str, Tour | Exception]:
    """Each spec's tour by tour_id, one pipeline call per group of shared settings; a failed group's error per tour.

    Specs that name a LoRA take it from `loras` (the pipeline's LoraSet), the others run without any; specs made on
    a geometry (mesh_uri, layout) get its renders from `geometry` (diffpano.data.proxy.spec_proxy), a failure there
    failing their tour only; `options` go to every pipeline call (num_ref_views, num_samples, use_epipolar, ...).
    """
    groups: dict[Settings, list[BulkSpec]] = {}
    out: dict[str, Tour | Exception] = {}
    given: dict[str, dict] = {}
    proxies: dict[str, Proxy] = {}
    for spec in specs:
        try:
            given[spec.tour_id] = read_given(spec.images or {})
            if spec.has_geometry():
                spec = spec.model_copy(update={"seed": random_seed() if spec.seed is None else spec.seed})
                if geometry is None:
                    raise ValueError("mesh_uri/layout: this generator makes no tours on a geometry")
                proxies[spec.tour_id] = geometry(spec, spec.seed, *pipe.check_size(spec.height, spec.width))
        except (ValueError, OSError) as err:  # an unreadable given panorama or mesh fails its tour only
            out[spec.tour_id] = err
            continue
        groups.setdefault(settings(spec), []).append(spec)
    for key, members in groups.items():
        try:
            if loras is not None:
                loras.use(key.lora)
            elif key.lora is not None:
                raise ValueError(f"lora: {key.lora!r} asked for, but this generator serves no LoRAs")
            out.update((t.tour_id, t) for t in _generate(pipe, members, key, options, given, proxies))
        except Exception as err:  # noqa: BLE001 - the caller decides per tour (record it, answer 422 or 503)
            out.update((s.tour_id, err) for s in members)
    return out


def _generate(pipe, specs: list[BulkSpec], key: Settings, options: dict, given: dict[str, dict],
              proxies: dict[str, Proxy]) -> list[Tour]:
    """One pipeline call for specs that share `key`, with their given panoramas and geometry by tour id."""
    seeds = [s.seed if s.seed is not None else random_seed() for s in specs]
    if key.given_views:
        size = pipe.check_size(key.height, key.width)
        options = options | {"known_views": [known_views(given[s.tour_id], key.views, *size, "images")[0]
                                             for s in specs]}
    poses = np.stack([s.pose_array() for s in specs])
    depths = [None] * len(specs)
    if key.strength is not None:
        made = [proxies[s.tour_id] for s in specs]
        poses, depths = np.stack([p.poses for p in made]), [p.depth for p in made]
        options = options | {"image": np.stack([p.rgb for p in made]), "strength": key.strength}
    out = pipe([s.prompt_list() for s in specs], poses, height=key.height, width=key.width,
               num_inference_steps=key.steps, guidance_scale=key.guidance, seed=seeds, scheduler=key.scheduler,
               **options)
    model = pipe.model_name if key.lora is None else f"{pipe.model_name}+lora:{key.lora}"
    return [Tour(s.tour_id, out.images[i], list(out.prompts[i]), out.poses[i], out.seeds[i], model, key.steps,
                 key.guidance, out.scheduler, depths=depths[i]) for i, s in enumerate(specs)]


def pending(out: str, specs: Sequence[BulkSpec]) -> list[BulkSpec]:
    """The specs whose tour the manifest under out does not hold yet (a re-run completes, never duplicates)."""
    present = tour_ids(out)
    return [s for s in specs if s.tour_id not in present]


def record_failures(out: str, name: str, records: Sequence[dict]) -> str | None:
    """Write failure records as OUT/failures/NAME.jsonl; returns its URI (None when there is nothing to record)."""
    if not records:
        return None
    uri = storage.join(out, "failures", f"{name}.jsonl")
    storage.write_bytes(uri, "\n".join(json.dumps(r) for r in records).encode() + b"\n")
    return uri


def error_text(err: Exception) -> str:
    """How a failed tour's error is recorded."""
    return f"{type(err).__name__}: {err}"
