"""Offline bulk jobs: tour specs (docs/bulk-specs.md) in, tours (docs/tours.md) out on a pool of Ray actors, once.

A batch belongs to the job, not to a replica (fanout.actors): any live replica takes the next one, and the batches
of a replica that died (its node lost) go back to the queue. A batch's manifest part is named after its tour ids, so
a batch that runs twice overwrites rather than duplicates. Parts stay few however long the job: a local manifest is
compacted as the job runs; on S3 batches stage their parts and a publisher beside the loop merges them into manifest/
(diffpano.io.compaction).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from diffpano.data.proxy import spec_proxy
from diffpano.defaults import COMPACT_EVERY, MAX_LORAS, PUBLISH_S, REPLICAS, STALL_S, TOURS_PER_BATCH
from diffpano.io import storage
from diffpano.io.compaction import Publisher, compact_local, publish_pending
from diffpano.io.manifest import Tour, commit_tours, tour_ids
from diffpano.io.storage import StorageUnavailable
from diffpano.models.lora import LoraSet
from diffpano.pipelines.compiling import check_mode, compile_pipeline
from diffpano.pipelines.loading import check_model, resolve_model
from diffpano.pipelines.tours import error_text, make_tours, record_failures
from diffpano.specs import BulkSpec, SpecError, SpecRows
from fanout.actors import PoolState, StalledError, map_on_actors, start_actors
from fanout.tasks import Background, actor_beside, task_beside

OUTAGE_PROBE_S = 5.0  # seconds without an answer from any replica before the driver looks at storage


class TourWriter:
    """One model replica (a Ray actor): generates a batch of specs and commits them as one manifest part."""

    def __init__(self, model: str | None, out: str, device: str | None = None, threads: int | None = None,
                 options: dict | None = None, compile: str = "off", scheduler: str | None = None,
                 pending: bool = False, lora_root: str | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pipe = compile_pipeline(resolve_model(model, device, scheduler=scheduler), check_mode(compile))
        self.pipe.set_progress_bar_config(disable=True)
        self.loras = LoraSet(self.pipe, lora_root, MAX_LORAS)
        self.out, self.options, self.pending = out, dict(options or {}), pending

    def write(self, batch: list[str]) -> BatchResult:
        """Generate the batch's tours (JSON specs), commit the successful ones as one part (staged when pending)."""
        started = time.perf_counter()
        results = make_tours(self.pipe, [BulkSpec.model_validate_json(s) for s in batch], self.loras, spec_proxy,
                             **self.options)
        tours = [t for t in results.values() if isinstance(t, Tour)]
        errors = {tid: error_text(e) for tid, e in results.items() if isinstance(e, Exception)}
        model_s = time.perf_counter() - started
        if tours:
            commit_tours(self.out, tours, self.pending)
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
    compactions: int = 0  # merges of manifest parts as the job ran (local compactions, S3 publications)

    def line(self) -> str:
        """One-line summary for the console."""
        rate = self.tours_done / self.seconds if self.seconds else 0.0
        return (f"bulk {self.out}: {self.tours_done} tours / {self.views_done} views written, "
                f"{self.tours_skipped} already there, {len(self.failures)} failed, {len(self.invalid)} invalid "
                f"skipped, {self.seconds:.1f}s ({rate * 3600:.0f} tours/h)")


def run_bulk(specs: Sequence[BulkSpec] | SpecRows, out: str, model: str | None = None, replicas: int = REPLICAS,
             batch_size: int = TOURS_PER_BATCH, num_gpus: float = 0.0, cpus_per_replica: float = 1.0,
             progress: bool = True, invalid: list[SpecError] | None = None, options: dict | None = None,
             compile: str = "off", scheduler: str | None = None, stall_s: float = STALL_S,
             compact_every: int = COMPACT_EVERY, lora_root: str | None = None) -> BulkSummary:
    """Generate every spec whose tour is not yet in the manifest under out; failures go to OUT/failures/.

    `options` go to every pipeline call (num_ref_views, num_samples, use_epipolar: what an ablation varies); specs
    naming a `lora` take it from lora_root (ROOT/NAME/pytorch_lora_weights.safetensors);
    `compile` is the replicas' torch.compile mode (diffpano.pipelines.compiling); `scheduler` the sampler that
    replaces the model's own (specs naming theirs keep them). ValueError before any work when the model cannot
    sample. SpecRows are streamed: the driver holds their ids, not the specs. The job stops, resumable, saying why
    in the summary's `stopped`, when no replica answers for stall_s (no room left on the cluster) or storage stays
    unavailable past storage.storage_wait_s(). Every compact_every parts the job writes (0: never) they are merged,
    so that parts stay few however long the job: a local manifest is compacted; on S3 the parts are staged and
    published merged, also after PUBLISH_S, and at the end (parts a stopped job staged: when it starts again).
    """
    out = storage.absolute(out)
    summary = BulkSummary(out, len(specs), 0, invalid=list(invalid or []))
    started = time.perf_counter()
    bar = tqdm(total=len(specs), unit="tour", disable=not progress, desc="tours", mininterval=0)  # each batch shows
    stop_listening = storage.on_outage(lambda waited, err: bar.set_postfix_str(outage_line(waited)))
    try:
        present = tour_ids(out)  # the resume check: the manifest's tour_id column alone
        publish_pending(out, present)  # what a stopped job staged counts as there once published
        todo = sum(tid not in present for tid in (specs.ids if isinstance(specs, SpecRows) else
                                                  [s.tour_id for s in specs]))
        summary.tours_skipped = len(specs) - todo
        bar.update(summary.tours_skipped)
        if todo:
            check_model(model, own_scheduler=scheduler is None)
            device, threads = "cuda" if num_gpus else "cpu", max(1, int(cpus_per_replica))
            stage = compact_every > 0 and storage.is_remote(out)
            pool = start_actors(TourWriter, min(replicas, -(-todo // batch_size)), model, out, device, threads,
                                options, compile, scheduler, stage, lora_root, num_cpus=cpus_per_replica,
                                num_gpus=num_gpus)
            rows = specs.json_rows() if isinstance(specs, SpecRows) else (
                (s.tour_id, s.model_dump_json()) for s in specs)
            batches = in_batches((row for tid, row in rows if tid not in present), batch_size)
            merges = Merges(out, compact_every, stage) if compact_every > 0 else None
            _write_all(pool, batches, summary, bar, stall_s, started, merges)
    except (StalledError, StorageUnavailable) as err:
        summary.stopped = stop_reason(err)
    finally:
        stop_listening()
        bar.close()
    _record(summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _write_all(pool: list, batches: Iterable[list[str]], summary: BulkSummary, bar: tqdm, stall_s: float,
               started: float, merges: Merges | None) -> None:
    """Run the batches on the pool, counting into summary and showing replicas (and storage outages) on the bar,
    merging manifest parts as they are written."""
    state = PoolState(len(pool))

    def show(new: PoolState | None = None) -> None:
        nonlocal state
        state = new or state
        rate = summary.tours_done / (time.perf_counter() - started) * 3600
        bar.set_postfix_str(f"{rate:.0f} tours/h, replicas {state.line()}")

    def idle(seconds: float) -> bool:
        """After a quiet spell, look at storage: while it is out, the replicas are waiting for it, not stalled."""
        if seconds < OUTAGE_PROBE_S or storage.reachable(summary.out):
            return False
        bar.set_postfix_str(outage_line(seconds))
        return True

    try:
        for result in map_on_actors(pool, "write", batches, stall_s=stall_s, on_give_up=_given_up, on_state=show,
                                    on_idle=idle):
            summary.model_seconds += result.model_seconds
            summary.tours_done += len(result.views)
            summary.views_done += sum(result.views.values())
            summary.failures += list(result.errors.items())
            bar.update(len(result.views) + len(result.errors))
            show()
            if merges and result.views:
                summary.compactions += merges.written()
    except StalledError:
        if merges:
            merges.settle()  # storage is fine: publish what the replicas wrote before the job stops
        raise
    if merges:
        if merges.stage:
            bar.set_postfix_str("publishing the manifest")
        merges.settle()


class Merges:
    """When a running job merges its manifest parts, one merge at a time beside its loop (dispatch never waits):
    every `every` parts written, compacting a local manifest, or publishing the parts staged on S3 (those also
    once PUBLISH_S have passed, so that tours become visible as the job goes)."""

    def __init__(self, out: str, every: int, stage: bool) -> None:
        self.every, self.stage, self.parts, self.last = every, stage, 0, time.monotonic()
        self.background = (Background(actor_beside(Publisher, out).publish) if stage else
                           Background(task_beside(compact_local), out, True))

    def written(self) -> bool:
        """Count a part written; start a merge when one is due (True when it started)."""
        self.parts += 1
        due = self.parts >= self.every or (self.stage and time.monotonic() - self.last >= PUBLISH_S)
        if not (due and self.background.start()):
            return False
        self.parts, self.last = 0, time.monotonic()
        return True

    def settle(self) -> None:
        """Wait for the last merge, then publish what is still staged."""
        self.background.wait()
        if self.stage:
            self.background.start()
            self.background.wait()


def in_batches(rows: Iterable[str], size: int) -> Iterator[list[str]]:
    """JSON specs `size` at a time (drawn as replicas free up, so a spec file is read as the job goes)."""
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def outage_line(waited: float) -> str:
    """What the bar says while storage is out."""
    return f"storage unavailable, retrying ({waited:.0f}s)"


def stop_reason(err: Exception) -> str:
    """Why a job stopped, in one line (a replica's error without Ray's remote traceback)."""
    cause = getattr(err, "cause", None) or err
    return str(cause).splitlines()[0]


def _record(summary: BulkSummary) -> None:
    """Write the job's failures and invalid specs under OUT/failures/ (a storage outage here stops the job too)."""
    records = [{"tour_id": t, "error": e} for t, e in summary.failures]
    records += [{"line": e.line, "field": e.field, "error": e.message} for e in summary.invalid]
    try:
        summary.failures_uri = record_failures(summary.out, f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}",
                                               records)
    except StorageUnavailable as err:
        summary.stopped = summary.stopped or f"{stop_reason(err)} (failures not recorded; a re-run retries them)"


def _given_up(batch: list[str], err: Exception) -> BatchResult:
    """A batch whose replicas kept dying under it: each of its tours is a failure naming why."""
    why = f"its replica was lost {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return BatchResult(views={}, errors={BulkSpec.model_validate_json(s).tour_id: why for s in batch}, model_seconds=0)
