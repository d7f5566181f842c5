"""Offline bulk jobs: tour specs (docs/bulk-specs.md) in, tours (docs/tours.md) out on a pool of Ray actors, once.

The pool is plain Ray core actors rather than a Ray Data actor pool: Ray Data passes its actors' constructor
arguments through the object store while asking for restarts, which Ray cannot honour (ray-project/ray#53727,
logged as an ERROR on every job), and its output reached the driver only at the end, so progress could not move.
Here each replica is built from two strings, restarts after a crash and re-runs the batch it held; a batch's
manifest part is named after its tour ids, so a re-run batch overwrites rather than duplicates.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import ray
from pydantic import Field, ValidationError
from tqdm import tqdm

from diffpano import storage
from diffpano.manifest import Tour, commit_tours, read_manifest
from diffpano.modelio import resolve_model
from diffpano.pipelines import DEFAULT_GUIDANCE
from serve.schemas import TourRequest

DEFAULT_STEPS = 30


class BulkSpec(TourRequest):
    """One tour of a bulk job: the HTTP request fields (same rules) plus a unique tour_id."""

    tour_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")


@dataclass
class SpecError:
    """A spec that failed validation: its line (1-based) and what is wrong."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


def read_spec_rows(uri: str) -> list[dict]:
    """Rows of a JSONL or Parquet spec file (local or s3://); ValueError names a line that is not JSON."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    rows = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"specs: line {n}: not valid JSON ({err.msg})") from None
    return rows


def validate_specs(rows: list[dict]) -> tuple[list[BulkSpec], list[SpecError]]:
    """Specs that pass the HTTP API's rules, and an error per row that does not (duplicate ids included)."""
    good, errors, seen = [], [], set()
    for n, row in enumerate(rows, 1):
        if isinstance(row, dict):  # Parquet rows carry every column; absent fields are None there
            row = {k: v for k, v in row.items() if v is not None}
        try:
            spec = BulkSpec.model_validate(row)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "spec"
            errors.append(SpecError(n, where, first["msg"].removeprefix("Value error, ")))
            continue
        if spec.tour_id in seen:
            errors.append(SpecError(n, "tour_id", f"duplicate tour_id {spec.tour_id!r}"))
            continue
        seen.add(spec.tour_id)
        good.append(spec)
    return good, errors


def synthetic_specs(count: int, views: int = 4, seed: int = 0, steps: int | None = None) -> list[dict]:
    """Specs of walks through procedural scenes, from room to room, with each view's own caption."""
    from diffpano.data.build import BuildSpec, render_clips

    spec = BuildSpec(scenes=count, clips_per_scene=1, frames=views, height=16, width=32, seed=seed, depth=False,
                     face_size=16)
    out = []
    for i in range(count):
        clip = render_clips(spec, i, [0])[0]
        out.append({"tour_id": f"synthetic-{seed}-{i:06d}", "prompts": list(clip.captions),
                    "poses": [p.reshape(16).tolist() for p in clip.poses], "seed": seed * 1_000_003 + i}
                   | ({"num_inference_steps": steps} if steps else {}))
    return out


class TourWriter:
    """One model replica (a Ray actor): generates a batch of specs and commits them as one manifest part."""

    def __init__(self, model: str | None, out: str, device: str | None = None, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pipe = resolve_model(model, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.out = out

    def write(self, batch: list[str]) -> BatchResult:
        """Generate the batch's tours (JSON specs, grouped by shared settings), commit the successful ones."""
        specs = [BulkSpec.model_validate_json(s) for s in batch]
        tours, errors, started = [], {}, time.perf_counter()
        groups: dict[tuple, list[BulkSpec]] = {}
        for s in specs:
            key = (s.view_count(), s.height, s.width, s.num_inference_steps, s.guidance_scale)
            groups.setdefault(key, []).append(s)
        for members in groups.values():
            try:
                tours += self._generate(members)
            except Exception as err:  # noqa: BLE001 - a failing spec is recorded and the rest go on
                errors.update({s.tour_id: f"{type(err).__name__}: {err}" for s in members})
        model_s = time.perf_counter() - started
        if tours:
            commit_tours(self.out, tours)
        return BatchResult(views={t.tour_id: len(t.images) for t in tours}, errors=errors, model_seconds=model_s)

    def _generate(self, specs: list[BulkSpec]) -> list[Tour]:
        """One pipeline call for specs that share view count, size, steps and guidance."""
        first = specs[0]
        steps = first.num_inference_steps or DEFAULT_STEPS
        guidance = DEFAULT_GUIDANCE if first.guidance_scale is None else first.guidance_scale
        seeds = [s.seed if s.seed is not None else int.from_bytes(os.urandom(7), "big") for s in specs]
        out = self.pipe([s.prompt_list() for s in specs], np.stack([s.pose_array() for s in specs]),
                        height=first.height, width=first.width, num_inference_steps=steps, guidance_scale=guidance,
                        seed=seeds)
        return [Tour(s.tour_id, out.images[i], list(out.prompts[i]), out.poses[i], out.seeds[i],
                     self.pipe.model_name, steps, guidance) for i, s in enumerate(specs)]


@dataclass
class BatchResult:
    """What a replica reports for one committed batch."""

    views: dict[str, int]  # tour_id -> views written
    errors: dict[str, str]  # tour_id -> why it failed
    model_seconds: float


@dataclass
class BulkSummary:
    """What a bulk job did."""

    out: str
    tours_total: int
    tours_skipped: int
    tours_done: int = 0
    views_done: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[SpecError] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0  # replica time spent generating (the rest of replica time is I/O and overhead)
    failures_uri: str | None = None

    def line(self) -> str:
        """One-line summary for the console."""
        rate = self.tours_done / self.seconds if self.seconds else 0.0
        return (f"bulk {self.out}: {self.tours_done} tours / {self.views_done} views written, "
                f"{self.tours_skipped} already there, {len(self.failures)} failed, {len(self.invalid)} invalid "
                f"skipped, {self.seconds:.1f}s ({rate * 3600:.0f} tours/h)")


def run_bulk(specs: list[BulkSpec], out: str, model: str | None = None, replicas: int = 1, batch_size: int = 4,
             num_gpus: float = 0.0, cpus_per_replica: float = 1.0, progress: bool = True,
             invalid: list[SpecError] | None = None) -> BulkSummary:
    """Generate every spec whose tour is not yet in the manifest under out; failures go to OUT/failures/."""
    out = storage.absolute(out)
    present = set(read_manifest(out).column("tour_id").to_pylist())
    todo = [s for s in specs if s.tour_id not in present]
    summary = BulkSummary(out, len(specs), len(specs) - len(todo), invalid=list(invalid or []))
    started = time.perf_counter()
    if todo:
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        writer = ray.remote(TourWriter).options(
            num_cpus=cpus_per_replica, num_gpus=num_gpus, max_restarts=-1, max_task_retries=-1,
            runtime_env={"env_vars": storage.worker_env()})
        pool = [writer.remote(model, out, "cuda" if num_gpus else "cpu", max(1, int(cpus_per_replica)))
                for _ in range(min(replicas, -(-len(todo) // batch_size)))]
        batches = [[s.model_dump_json() for s in todo[i:i + batch_size]] for i in range(0, len(todo), batch_size)]
        bar = tqdm(total=len(todo), unit="tour", disable=not progress, desc="tours", mininterval=0)  # each batch shows
        for result in _run_on_pool(pool, batches):
            summary.model_seconds += result.model_seconds
            summary.tours_done += len(result.views)
            summary.views_done += sum(result.views.values())
            summary.failures += list(result.errors.items())
            bar.update(len(result.views) + len(result.errors))
            bar.set_postfix_str(f"{summary.tours_done / (time.perf_counter() - started) * 3600:.0f} tours/h")
        bar.close()
    if summary.failures or summary.invalid:
        records = [{"tour_id": t, "error": e} for t, e in summary.failures]
        records += [{"line": e.line, "field": e.field, "error": e.message} for e in summary.invalid]
        summary.failures_uri = storage.join(out, "failures", f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
                                                                ".jsonl")
        storage.write_bytes(summary.failures_uri, "\n".join(json.dumps(r) for r in records).encode() + b"\n")
    summary.seconds = time.perf_counter() - started
    return summary


def _run_on_pool(replicas: list, batches: list[list[str]], per_replica: int = 2) -> Iterator[BatchResult]:
    """Each batch's result as soon as it is committed; a replica holds `per_replica` batches (one queued)."""
    waiting, running = list(reversed(batches)), {}
    for replica in replicas * per_replica:
        if waiting:
            running[replica.write.remote(waiting.pop())] = replica
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        replica = running.pop(ref)
        if waiting:
            running[replica.write.remote(waiting.pop())] = replica
        yield ray.get(ref)


def run_online(endpoint: str, specs: list[BulkSpec], output: str | None, api_key: str | None = None,
               progress: bool = True, poll_s: float = 1.0) -> dict:
    """Submit the specs as a job to a running server (POST /v1/jobs) and follow it to its end; the last status."""
    import requests

    headers = {"X-API-Key": api_key} if api_key else {}
    body = {"specs": [s.model_dump(exclude_none=True, exclude={"output"}) for s in specs], "output": output}
    r = requests.post(f"{endpoint.rstrip('/')}/v1/jobs", json=body, headers=headers, timeout=60)
    if r.status_code != 202:
        raise ValueError(f"--endpoint: the server answered {r.status_code}: {r.text[:500]}")
    status = r.json()
    bar = tqdm(total=status["tours_total"], unit="tour", disable=not progress, desc=status["job_id"])
    while status["state"] in ("queued", "running"):
        time.sleep(poll_s)
        status = requests.get(f"{endpoint.rstrip('/')}/v1/jobs/{status['job_id']}", headers=headers,
                              timeout=60).json()
        bar.update(status["tours_done"] + status["tours_failed"] - bar.n)
    bar.close()
    return status
