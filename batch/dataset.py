"""Builds a procedural training dataset on Ray (or a local process pool): one task per scene renders and commits its
missing clips."""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from functools import partial

from tqdm import tqdm

from batch.ray_init import ensure_ray
from diffpano.data.build import BuildSpec, build_scene, check_spec_file, pending_clips
from diffpano.storage import worker_env


@dataclass
class BuildSummary:
    """What a build did."""

    out: str
    scenes: int
    clips_written: int
    frames_written: int
    clips_present: int
    seconds: float

    def line(self) -> str:
        """One-line summary for the console."""
        rate = self.frames_written / self.seconds if self.seconds > 0 else 0.0
        return (
            f"dataset {self.out}: {self.clips_written} clips / {self.frames_written} keyframes written "
            f"({self.clips_present} clips already there), {self.scenes} scenes, {self.seconds:.1f}s, "
            f"{rate:.1f} keyframes/s"
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
        run = _run_in_pool(spec, plan, out, processes) if processes else _run_on_ray(spec, plan, out, max_in_flight)
        for result in run:
            written += result["clips"]
            frames += result["frames"]
            bar.update(result["frames"])
    return BuildSummary(out, spec.scenes, written, frames, total_clips - todo, time.perf_counter() - started)


def _build_entry(spec: BuildSpec, out: str, item: tuple[int, list[int]]) -> dict:
    """build_scene for one (scene, clips) item of the plan."""
    return build_scene(spec, item[0], item[1], out)


def _run_in_pool(spec: BuildSpec, plan: dict[int, list[int]], out: str, processes: int):
    """Results of the plan's scenes rendered by a local process pool, as they finish."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap_unordered(partial(_build_entry, spec, out), list(plan.items()))


def _run_on_ray(spec: BuildSpec, plan: dict[int, list[int]], out: str, max_in_flight: int | None):
    """Results of the plan's scenes rendered by Ray tasks (a bounded number in flight), as they finish."""
    import ray

    ensure_ray()
    task = ray.remote(build_scene).options(num_cpus=1, max_retries=2, runtime_env={"env_vars": worker_env()})
    limit = max_in_flight or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    queue = list(plan.items())
    running: list = []
    while queue or running:
        while queue and len(running) < limit:
            scene, clips = queue.pop(0)
            running.append(task.remote(spec, scene, clips, out))
        done, running = ray.wait(running, num_returns=1)
        yield ray.get(done[0])
