"""Builds training datasets from any source (procedural scenes, meshes, captures; diffpano.data.sources), one Ray task
per scene (or a local process pool), each committing the scene's missing clips; a failed scene is recorded in
OUT/failures/ and the others complete. Idempotent: a re-run builds only what is missing."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from dataclasses import dataclass, field
from functools import partial

from tqdm import tqdm

from diffpano.data.sources import SceneJob, SceneResult, SourceSpec, check_spec_file, run_scene, scene_ids
from diffpano.pipelines.tours import record_failures
from fanout.tasks import map_tasks


@dataclass
class BuildSummary:
    """What a build did."""

    out: str
    scenes: int
    clips_present: int
    clips_written: int = 0
    frames_written: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)  # per failed scene: scene, source, error
    failures_uri: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # per-scene counts summed (captures: frames read, ...)

    def add(self, result: SceneResult) -> None:
        """Count one scene's result in."""
        self.clips_written += result.clips
        self.frames_written += result.frames
        for name, n in result.counts.items():
            self.counts[name] = self.counts.get(name, 0) + n
        if result.error:
            self.failures.append({"scene": result.scene, "source": result.source, "error": result.error})

    def line(self) -> str:
        """One-line summary for the console."""
        rate = self.frames_written / self.seconds if self.seconds > 0 else 0.0
        counts = ", ".join(f"{n} {name}" for name, n in self.counts.items())
        return (
            f"dataset {self.out}: {self.clips_written} clips / {self.frames_written} keyframes written "
            f"({self.clips_present} clips already there), {self.scenes} scenes, {self.seconds:.1f}s, "
            f"{rate:.1f} keyframes/s" + (f"; frames: {counts}" if counts else "")
            + (f", {len(self.failures)} scene(s) failed" if self.failures else "")
        )


def build_dataset(spec: SourceSpec, out: str, inputs: list[str] = (), progress: bool = True,
                  max_in_flight: int | None = None, processes: int | None = None) -> BuildSummary:
    """Build every scene of the spec (over its input files, for meshes and captures) that out does not hold yet, as
    Ray tasks (or `processes` local processes, without Ray), with a bar that moves as scenes finish."""
    started = time.perf_counter()
    check_spec_file(out, spec)
    plan = spec.plan(out, scene_ids(inputs, spec.input_name) if spec.input_name else {})
    summary = BuildSummary(out, plan.scenes, plan.clips_present)
    items = [(spec, job, out) for job in plan.jobs]
    with tqdm(total=len(items), unit="scene", desc=spec.kind, disable=not progress or not items) as bar:
        if not items:
            results = iter(())
        elif processes:
            results = _run_in_pool(items, processes)
        else:
            results = map_tasks(run_scene, items, max_in_flight=max_in_flight, on_error=_scene_failed)
        for result in results:
            summary.add(result)
            bar.set_postfix_str(f"{summary.frames_written} keyframes, {len(summary.failures)} failed", refresh=False)
            bar.update(1)
    stamp = f"{spec.kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    summary.failures_uri = record_failures(out, stamp, summary.failures)
    summary.seconds = time.perf_counter() - started
    return summary


def _run_in_pool(items: list[tuple], processes: int):
    """run_scene results of the items, built by a local process pool, as they finish."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(partial(_call, run_scene), items)


def _call(fn, item: tuple):
    """fn(*item), for a process pool."""
    return fn(*item)


def _scene_failed(item: tuple, err: Exception) -> SceneResult:
    """The result of a scene whose task failed outright (its worker died: out of memory, a crash)."""
    job: SceneJob = item[1]
    return SceneResult(job.scene, job.source, error=f"{type(err).__name__}: {err}")

