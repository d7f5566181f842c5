"""Offline bulk jobs: tour specs (docs/bulk-specs.md) in, tours (docs/tours.md) out on a pool of Ray actors, once.

A batch belongs to the job, not to a replica (fanout.actors): any live replica takes the next one, and the batches
of a replica that died (its node lost) go back to the queue. A batch's manifest part is named after its tour ids, so
a batch that runs twice overwrites rather than duplicates.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from tqdm import tqdm

from diffpano.defaults import REPLICAS, STALL_S, TOURS_PER_BATCH
from diffpano.io import storage
from diffpano.io.manifest import Tour, commit_tours
from diffpano.pipelines.compiling import check_mode, compile_pipeline
from diffpano.pipelines.loading import check_model, resolve_model
from diffpano.pipelines.tours import error_text, make_tours, pending, record_failures
from diffpano.specs import BulkSpec, SpecError
from fanout.actors import PoolState, StalledError, map_on_actors, start_actors


class TourWriter:
    """One model replica (a Ray actor): generates a batch of specs and commits them as one manifest part."""

    def __init__(self, model: str | None, out: str, device: str | None = None, threads: int | None = None,
                 options: dict | None = None, compile: str = "off", scheduler: str | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pipe = compile_pipeline(resolve_model(model, device, scheduler=scheduler), check_mode(compile))
        self.pipe.set_progress_bar_config(disable=True)
        self.out, self.options = out, dict(options or {})

    def write(self, batch: list[str]) -> BatchResult:
        """Generate the batch's tours (JSON specs), commit the successful ones as one part."""
        started = time.perf_counter()
        results = make_tours(self.pipe, [BulkSpec.model_validate_json(s) for s in batch], **self.options)
        tours = [t for t in results.values() if isinstance(t, Tour)]
        errors = {tid: error_text(e) for tid, e in results.items() if isinstance(e, Exception)}
        model_s = time.perf_counter() - started
        if tours:
            commit_tours(self.out, tours)
        return BatchResult(views={t.tour_id: len(t.images) for t in tours}, errors=errors, model_seconds=model_s)


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
    stopped: str | None = None  # why the job stopped before its end (resumable), None when it finished

    def line(self) -> str:
        """One-line summary for the console."""
        rate = self.tours_done / self.seconds if self.seconds else 0.0
        return (f"bulk {self.out}: {self.tours_done} tours / {self.views_done} views written, "
                f"{self.tours_skipped} already there, {len(self.failures)} failed, {len(self.invalid)} invalid "
                f"skipped, {self.seconds:.1f}s ({rate * 3600:.0f} tours/h)")


def run_bulk(specs: list[BulkSpec], out: str, model: str | None = None, replicas: int = REPLICAS,
             batch_size: int = TOURS_PER_BATCH, num_gpus: float = 0.0, cpus_per_replica: float = 1.0,
             progress: bool = True, invalid: list[SpecError] | None = None, options: dict | None = None,
             compile: str = "off", scheduler: str | None = None, stall_s: float = STALL_S) -> BulkSummary:
    """Generate every spec whose tour is not yet in the manifest under out; failures go to OUT/failures/.

    `options` go to every pipeline call (num_ref_views, num_samples, use_epipolar: what an ablation varies);
    `compile` is the replicas' torch.compile mode (diffpano.pipelines.compiling); `scheduler` the sampler that
    replaces the model's own (specs naming theirs keep them). ValueError before any work when the model cannot
    sample. With no replica answering for stall_s (no room left on the cluster) the job stops, resumable, and says
    why in the summary's `stopped`.
    """
    out = storage.absolute(out)
    todo = pending(out, specs)
    summary = BulkSummary(out, len(specs), len(specs) - len(todo), invalid=list(invalid or []))
    started = time.perf_counter()
    if todo:
        check_model(model, own_scheduler=scheduler is None)
        device, threads = "cuda" if num_gpus else "cpu", max(1, int(cpus_per_replica))
        pool = start_actors(TourWriter, min(replicas, -(-len(todo) // batch_size)), model, out, device, threads,
                            options, compile, scheduler, num_cpus=cpus_per_replica, num_gpus=num_gpus)
        batches = [[s.model_dump_json() for s in todo[i:i + batch_size]] for i in range(0, len(todo), batch_size)]
        bar = tqdm(total=len(todo), unit="tour", disable=not progress, desc="tours", mininterval=0)  # each batch shows
        state = PoolState(len(pool))

        def show(new: PoolState | None = None) -> None:
            nonlocal state
            state = new or state
            rate = summary.tours_done / (time.perf_counter() - started) * 3600
            bar.set_postfix_str(f"{rate:.0f} tours/h, replicas {state.line()}")

        try:
            for result in map_on_actors(pool, "write", batches, stall_s=stall_s, on_give_up=_given_up, on_state=show):
                summary.model_seconds += result.model_seconds
                summary.tours_done += len(result.views)
                summary.views_done += sum(result.views.values())
                summary.failures += list(result.errors.items())
                bar.update(len(result.views) + len(result.errors))
                show()
        except StalledError as err:
            summary.stopped = str(err)
        bar.close()
    records = [{"tour_id": t, "error": e} for t, e in summary.failures]
    records += [{"line": e.line, "field": e.field, "error": e.message} for e in summary.invalid]
    summary.failures_uri = record_failures(out, f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}", records)
    summary.seconds = time.perf_counter() - started
    return summary


def _given_up(batch: list[str], err: Exception) -> BatchResult:
    """A batch whose replicas kept dying under it: each of its tours is a failure naming why."""
    why = f"its replica was lost {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return BatchResult(views={}, errors={BulkSpec.model_validate_json(s).tour_id: why for s in batch}, model_seconds=0)
