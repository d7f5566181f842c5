"""Builds training datasets on Ray (or a local process pool), one task per scene rendering and committing its missing
clips: procedural scenes (`build_dataset`), textured meshes (`render_meshes`) and 360-degree captures
(`capture_dataset`), the last two with failures recorded per scene."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from dataclasses import dataclass, field
from functools import partial

from tqdm import tqdm

from batch.ray_init import ensure_ray
from diffpano.data.build import BuildSpec, build_scene, check_spec_file, pending_clips
from diffpano.data.capture_build import FIXED_FIELDS as CAPTURE_FIELDS
from diffpano.data.capture_build import CaptureSpec, build_capture, pending_captures
from diffpano.data.mesh_build import FIXED_FIELDS, MeshSpec, build_mesh_scene, pending_mesh_clips, scene_ids
from diffpano.storage import worker_env
from diffpano.tours import record_failures


@dataclass
class BuildSummary:
    """What a build did."""

    out: str
    scenes: int
    clips_written: int
    frames_written: int
    clips_present: int
    seconds: float
    failures: list[dict] = field(default_factory=list)  # per failed scene: scene, path, error
    failures_uri: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # per-scene counts summed (captures: frames read, ...)

    def add(self, result: dict) -> None:
        """Count one scene task's result in."""
        self.clips_written += result["clips"]
        self.frames_written += result["frames"]
        for name, n in result.get("counts", {}).items():
            self.counts[name] = self.counts.get(name, 0) + n
        if "error" in result:
            self.failures.append({k: result[k] for k in ("scene", "path", "error")})

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


def build_dataset(spec: BuildSpec, out: str, progress: bool = True, max_in_flight: int | None = None,
                  processes: int | None = None) -> BuildSummary:
    """Render every clip of the spec that `out` does not hold yet, in parallel Ray tasks (or `processes` local
    processes, without Ray); idempotent."""
    spec.validate()
    check_spec_file(out, spec)
    plan = pending_clips(out, spec)
    total_clips = spec.scenes * spec.clips_per_scene
    todo = sum(len(c) for c in plan.values())
    started = time.perf_counter()
    if not plan:
        return BuildSummary(out, spec.scenes, 0, 0, total_clips, time.perf_counter() - started)
    written = frames = 0
    with tqdm(total=todo * spec.frames, unit="kf", desc="rendering", disable=not progress) as bar:
        items = [(spec, scene, clips, out) for scene, clips in plan.items()]
        run = _run_in_pool(items, processes) if processes else _run_on_ray(build_scene, items, max_in_flight)
        for result in run:
            written += result["clips"]
            frames += result["frames"]
            bar.update(result["frames"])
    return BuildSummary(out, spec.scenes, written, frames, total_clips - todo, time.perf_counter() - started)


def render_meshes(spec: MeshSpec, meshes: list[str], out: str, progress: bool = True,
                  max_in_flight: int | None = None) -> BuildSummary:
    """Render every clip of every mesh that `out` does not hold yet, a Ray task per mesh (Embree on its one CPU);
    a scene that fails is listed in OUT/failures/ and the others complete. Idempotent."""
    spec.validate()
    scenes = scene_ids(meshes)
    check_spec_file(out, spec, FIXED_FIELDS)
    plan = pending_mesh_clips(out, spec, scenes)
    total_clips = len(scenes) * spec.clips_per_scene
    todo = sum(len(c) for c in plan.values())
    summary = BuildSummary(out, len(scenes), 0, 0, total_clips - todo, 0.0)
    items = [(spec, scene, scenes[scene], clips, out, 1) for scene, clips in plan.items()]
    return _run_scenes(build_mesh_scene, items, summary, "render", progress, max_in_flight)


def capture_dataset(spec: CaptureSpec, captures: list[str], out: str, progress: bool = True,
                    max_in_flight: int | None = None) -> BuildSummary:
    """Reconstruct, caption and commit every capture that `out` does not hold yet, a Ray task per capture (COLMAP
    on its one CPU); a capture that fails is listed in OUT/failures/ and the others complete. Idempotent."""
    spec.validate()
    scenes = scene_ids(captures, "captures")
    check_spec_file(out, spec, CAPTURE_FIELDS)
    plan, clips_present = pending_captures(out, scenes)
    summary = BuildSummary(out, len(scenes), 0, 0, clips_present, 0.0)
    items = [(spec, scene, path, out, 1) for scene, path in plan.items()]
    return _run_scenes(build_capture, items, summary, "capture", progress, max_in_flight)


def _run_scenes(fn, items: list[tuple], summary: BuildSummary, kind: str, progress: bool,
                max_in_flight: int | None) -> BuildSummary:
    """fn(*item) per scene as Ray tasks, with a bar that moves as scenes finish; failures go to
    OUT/failures/KIND-*.jsonl."""
    started = time.perf_counter()
    with tqdm(total=len(items), unit="scene", desc=kind, disable=not progress or not items) as bar:
        for result in _run_on_ray(fn, items, max_in_flight, _scene_failed) if items else []:
            summary.add(result)
            bar.set_postfix_str(f"{summary.frames_written} keyframes, {len(summary.failures)} failed", refresh=False)
            bar.update(1)
    out = summary.out
    summary.failures_uri = record_failures(out, f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}",
                                           summary.failures)
    summary.seconds = time.perf_counter() - started
    return summary


def _call(fn, item: tuple):
    """fn(*item), for a process pool."""
    return fn(*item)


def _run_in_pool(items: list[tuple], processes: int):
    """build_scene results of the items, rendered by a local process pool, as they finish."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(partial(_call, build_scene), items)


def _run_on_ray(fn, items: list[tuple], max_in_flight: int | None, on_error=None):
    """fn(*item) of each item as a Ray task of one CPU (a bounded number in flight), as they finish. A task that
    still fails after its retries (its worker crashed, say) raises, or gives on_error(item, error) when set."""
    import ray

    ensure_ray()
    task = ray.remote(fn).options(num_cpus=1, max_retries=2, runtime_env={"env_vars": worker_env()})
    limit = max_in_flight or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    queue = list(items)
    running: dict = {}  # ref -> item
    while queue or running:
        while queue and len(running) < limit:
            item = queue.pop(0)
            running[task.remote(*item)] = item
        done, _ = ray.wait(list(running), num_returns=1)
        item = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayError as err:
            if on_error is None:
                raise
            result = on_error(item, err)
        yield result


def _scene_failed(item: tuple, err: Exception) -> dict:
    """build_mesh_scene's result for a scene whose task failed outright (its worker died: out of memory, a crash)."""
    _, scene, path, *_ = item
    return {"scene": scene, "path": path, "clips": 0, "frames": 0, "error": f"{type(err).__name__}: {err}"}
