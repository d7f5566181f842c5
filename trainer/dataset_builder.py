"""Builds a procedural training dataset on Ray: one task per scene renders and commits its missing clips."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ray
from tqdm import tqdm

from diffpano.data.build import BuildSpec, build_scene, check_spec_file, pending_clips
from diffpano.storage import worker_env


def ensure_ray(log_to_driver: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one (workers' prints shown here when log_to_driver)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=log_to_driver, include_dashboard=False)


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


def build_dataset(spec: BuildSpec, out: str, progress: bool = True, max_in_flight: int | None = None) -> BuildSummary:
    """Render every clip of the spec that `out` does not hold yet, in parallel Ray tasks; idempotent."""
    spec.validate()
    check_spec_file(out, spec)
    plan = pending_clips(out, spec)
    total_clips = spec.scenes * spec.clips_per_scene
    todo = sum(len(c) for c in plan.values())
    started = time.perf_counter()
    if not plan:
        return BuildSummary(out, spec.scenes, 0, 0, total_clips, time.perf_counter() - started)
    ensure_ray()
    task = ray.remote(build_scene).options(num_cpus=1, max_retries=2, runtime_env={"env_vars": worker_env()})
    limit = max_in_flight or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    queue = list(plan.items())
    running: list = []
    written = frames = 0
    with tqdm(total=todo * spec.frames, unit="kf", desc="rendering", disable=not progress) as bar:
        while queue or running:
            while queue and len(running) < limit:
                scene, clips = queue.pop(0)
                running.append(task.remote(spec, scene, clips, out))
            done, running = ray.wait(running, num_returns=1)
            result = ray.get(done[0])
            written += result["clips"]
            frames += result["frames"]
            bar.update(result["frames"])
    return BuildSummary(out, spec.scenes, written, frames, total_clips - todo, time.perf_counter() - started)
