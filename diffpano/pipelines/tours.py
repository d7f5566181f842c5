"""Tour specs into tours: the one path from specs to Tour records that the model deployment, offline and online bulk
jobs and evaluation all take, with the bookkeeping they share (what is already done, what failed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from diffpano.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, random_seed
from diffpano.io import storage
from diffpano.io.manifest import Tour, tour_ids
from diffpano.pipelines.given import known_views, read_given
from diffpano.specs import BulkSpec

if TYPE_CHECKING:
    from diffpano.models.lora import LoraSet


def settings(spec: BulkSpec) -> tuple:
    """What tours generated in one pipeline call must share: views, size, steps, guidance, scheduler, which views
    are given, and the LoRA."""
    steps = spec.num_inference_steps or DEFAULT_STEPS
    guidance = DEFAULT_GUIDANCE if spec.guidance_scale is None else spec.guidance_scale
    return (spec.view_count(), spec.height, spec.width, steps, guidance, spec.scheduler,
            tuple(sorted(spec.images or {})), spec.lora)


def make_tours(pipe, specs: Sequence[BulkSpec], loras: LoraSet | None = None, **options) -> dict[str, Tour | Exception]:
    """Each spec's tour by tour_id, one pipeline call per group of shared settings; a failed group's error per tour.

    Specs that name a LoRA take it from `loras` (the pipeline's LoraSet), the others run without any; `options` go
    to every pipeline call (num_ref_views, num_samples, use_epipolar, ...).
    """
    groups: dict[tuple, list[BulkSpec]] = {}
    out: dict[str, Tour | Exception] = {}
    given: dict[str, dict] = {}
    for spec in specs:
        try:
            given[spec.tour_id] = read_given(spec.images or {})
        except (ValueError, OSError) as err:  # an unreadable given panorama fails its tour only
            out[spec.tour_id] = err
            continue
        groups.setdefault(settings(spec), []).append(spec)
    for key, members in groups.items():
        try:
            if loras is not None:
                loras.use(key[-1])
            elif key[-1] is not None:
                raise ValueError(f"lora: {key[-1]!r} asked for, but this generator serves no LoRAs")
            out.update((t.tour_id, t) for t in _generate(pipe, members, key, options, given))
        except Exception as err:  # noqa: BLE001 - the caller decides per tour (record it, answer 422 or 503)
            out.update((s.tour_id, err) for s in members)
    return out


def _generate(pipe, specs: list[BulkSpec], key: tuple, options: dict, given: dict[str, dict]) -> list[Tour]:
    """One pipeline call for specs that share `key` (see settings), with their given panoramas by tour id."""
    views, height, width, steps, guidance, scheduler, given_views, lora = key
    seeds = [s.seed if s.seed is not None else random_seed() for s in specs]
    if given_views:
        size = pipe.check_size(height, width)
        options = options | {"known_views": [known_views(given[s.tour_id], views, *size, "images")[0] for s in specs]}
    out = pipe([s.prompt_list() for s in specs], np.stack([s.pose_array() for s in specs]), height=height,
               width=width, num_inference_steps=steps, guidance_scale=guidance, seed=seeds, scheduler=scheduler,
               **options)
    model = pipe.model_name if lora is None else f"{pipe.model_name}+lora:{lora}"
    return [Tour(s.tour_id, out.images[i], list(out.prompts[i]), out.poses[i], out.seeds[i], model, steps, guidance,
                 out.scheduler) for i, s in enumerate(specs)]


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
