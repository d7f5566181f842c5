"""Training throughput: Ray Train versus the same loop in this process, and 1 versus 2 workers (stage 1 and 2).

Each variant trains the tiny config for --steps optimiser steps through `trainer.run.train`; samples/s is measured
from the wall-clock stamps of consecutive steps in the run's metrics.csv (first --skip steps dropped), so everything
between steps (DDP all-reduce, Ray Train's reporting, data loading) counts. Goal: Ray overhead <= 5%.
Run: python bench/train_throughput.py [--steps 40] [--size 32x64] [--batch 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from common import format_table, goal_line, write_json  # noqa: E402

from diffpano.data.manifest import commit_clips  # noqa: E402
from diffpano.data.procedural.build import ProceduralSpec, render_clips  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.run import train  # noqa: E402

GOAL_OVERHEAD = 0.05
# (label, workers, CPUs per worker); workers 0 runs the loop in this process, without a Ray cluster.
VARIANTS = [("plain process, 2 threads", 0, 2), ("Ray Train, 1 worker x 2 CPUs", 1, 2),
            ("Ray Train, 2 workers x 1 CPU (DDP)", 2, 1)]


def throughput(metrics_csv: Path, per_step: int, skip: int) -> float:
    """Samples/s between the stamps of step `skip` and the last step."""
    rows = list(csv.DictReader(metrics_csv.open()))[skip - 1 :]
    steps = int(rows[-1]["step"]) - int(rows[0]["step"])
    return steps * per_step / (float(rows[-1]["time"]) - float(rows[0]["time"]))


def main() -> None:
    """Run every variant for both stages and print samples/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the rate")
    parser.add_argument("--size", default="32x64")
    parser.add_argument("--batch", type=int, default=8, help="stage-1 panoramas per step in all (split over workers)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="diffpano-bench-train-"))
    dataset = str(work / "ds")
    spec = ProceduralSpec(scenes=2, clips_per_scene=2, frames=6, height=h, width=w, seed=3)
    for s in range(spec.scenes):
        commit_clips(dataset, render_clips(spec, s, list(range(spec.clips_per_scene))))
    views, tours = 4, 2  # stage 2: tours of 4 views per step in all
    rows, results = [], {}
    for label, workers, cpus in VARIANTS:
        split = max(1, workers)
        torch.set_num_threads(cpus)
        cfg = load_config("trainer/configs/tiny.yaml", [
            f"data.dataset={dataset}", f"data.size=[{h}, {w}]", f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={cpus}", f"stage1.steps={args.steps}", f"stage2.steps={args.steps}",
            f"stage1.batch_size={args.batch // split}", f"stage2.batch_size={tours // split}",
            f"stage2.views={views}", f"run.checkpoint_every={args.steps}", "run.sample_steps=1",
            "run.max_failures=0",
        ])
        name = f"run{workers}"
        started = time.perf_counter()
        train(cfg, [1, 2], name, str(work / "runs"))
        wall = time.perf_counter() - started
        logs = work / "runs" / name / "logs"
        r1 = throughput(logs / "stage1" / "metrics.csv", args.batch, args.skip)
        r2 = throughput(logs / "stage2" / "metrics.csv", tours * views, args.skip)
        results[label] = {"stage1_samples_per_s": r1, "stage2_views_per_s": r2, "wall_s": wall}
        rows.append([label, f"{r1:.1f}", f"{r2:.1f}", f"{wall:.0f}"])
    base = results[VARIANTS[0][0]]
    print(format_table(["variant", "stage-1 panoramas/s", "stage-2 views/s", "wall s (both stages)"], rows))
    for label, *_ in VARIANTS[1:]:
        r = results[label]
        for key in ("stage1_samples_per_s", "stage2_views_per_s"):
            r[f"{key}_ratio"] = r[key] / base[key]
        print(f"{label}: stage 1 {r['stage1_samples_per_s_ratio']:.3f}x, stage 2 {r['stage2_views_per_s_ratio']:.3f}x "
              "of the plain process")
    one = results[VARIANTS[1][0]]
    overhead = max(1 - one["stage1_samples_per_s_ratio"], 1 - one["stage2_views_per_s_ratio"])
    print(goal_line(f"Ray Train overhead (1 worker vs plain) {overhead:+.1%} <= {GOAL_OVERHEAD:.0%}",
                    overhead <= GOAL_OVERHEAD))
    write_json(args.json, {"steps": args.steps, "size": [h, w], "batch": args.batch, "results": results})


if __name__ == "__main__":
    main()
