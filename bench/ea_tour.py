"""What the EA modules cost a user: an 8-view tour with them over the same tour with --no-epipolar, time and memory.

Runs the bundled model (or --model) as `diffpano generate` does, the cases interleaved, at each size. Peak memory is
the process's peak RSS in a fresh subprocess per case (what the machine must have), plus the tour's own peak
allocation from torch's profiler. Goals: time ratio <= 1.10 at every size; extra peak memory with EA <= 10%.
Run: python bench/ea_tour.py [--sizes 128x256:10 256x512:4] [--views 8] [--repeats 2] [--json P]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import format_table, goal_line, median, write_json

from diffpano.geometry.trajectories import walk
from diffpano.ops.memory import cpu_peak_profiler
from diffpano.pipelines.loading import load_model

GOAL_TIME, GOAL_MEMORY = 1.10, 0.10
MODEL = "diffpano/assets/model"
PROMPT = "a cozy living room with a grey sofa, a wooden floor and large windows"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="model directory (default: the bundled model)")
    p.add_argument("--sizes", nargs="+", default=["128x256:10", "256x512:4"], help="HxW:steps cases")
    p.add_argument("--views", type=int, default=8, help="views of the tour (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="timed tours per case (default 2)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one case in a subprocess: peak RSS
    return p.parse_args()


def tour(pipe, size: str, views: int, use_epipolar: bool):
    """A closure generating one tour of `size` ("HxW:steps")."""
    hw, steps = size.split(":")
    height, width = map(int, hw.split("x"))
    poses = walk(views, spacing=1.0)
    return lambda: pipe(PROMPT, poses, height=height, width=width, num_inference_steps=int(steps), seed=0,
                        use_epipolar=use_epipolar)


def worker(args: argparse.Namespace) -> None:
    """Generate one tour of one case and print the process's peak RSS (MB) as JSON."""
    size, use_ea = args.worker.rsplit(",", 1)
    pipe = load_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    tour(pipe, size, args.views, use_ea == "1")()
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rss_of(args: argparse.Namespace, size: str, use_ea: bool) -> float:
    """Peak RSS (MB) of a fresh process that loads the model and generates one tour."""
    cmd = [sys.executable, __file__, "--model", args.model, "--views", str(args.views),
           "--worker", f"{size},{int(use_ea)}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["max_rss_mb"]


def main() -> None:
    """Time both cases at every size, measure memory, print the table and the goal verdicts."""
    args = parse_args()
    if args.worker:
        return worker(args)
    start = time.perf_counter()
    pipe = load_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.views}-view tour, model {args.model}")
    rows, records = [], []
    for size in args.sizes:
        cases = {ea: tour(pipe, size, args.views, ea) for ea in (True, False)}
        for fn in cases.values():
            fn()  # warm-up (the EA kernel compiles on first use)
        times = {ea: [] for ea in cases}
        for _ in range(args.repeats):
            for ea, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[ea].append(time.perf_counter() - t0)
        alloc = {ea: cpu_peak_profiler(fn)[0] / 2**20 for ea, fn in cases.items()}
        rss = {ea: rss_of(args, size, ea) for ea in cases}
        rec = {"size": size, "ea_s": median(times[True]), "no_ea_s": median(times[False]),
               "ea_alloc_mb": alloc[True], "no_ea_alloc_mb": alloc[False], "ea_rss_mb": rss[True],
               "no_ea_rss_mb": rss[False], "all_s": {str(k): v for k, v in times.items()}}
        rec["time_ratio"] = rec["ea_s"] / rec["no_ea_s"]
        rec["rss_extra"] = rss[True] / rss[False] - 1
        rec["alloc_extra"] = alloc[True] / alloc[False] - 1
        records.append(rec)
        rows.append([size, rec["ea_s"], rec["no_ea_s"], rec["time_ratio"], rss[True], rss[False],
                     rec["rss_extra"], alloc[True], alloc[False], rec["alloc_extra"]])
        print(f"  measured {size}: ratio {rec['time_ratio']:.3f}", flush=True)
    print(format_table(["size:steps", "EA s", "no-EA s", "EA/no-EA time", "EA peak RSS MB", "no-EA peak RSS MB",
                        "extra RSS", "EA tour alloc MB", "no-EA tour alloc MB", "extra alloc"], rows))
    for rec in records:
        print(goal_line(f"{rec['size']}: time ratio {rec['time_ratio']:.3f} <= {GOAL_TIME}",
                        rec["time_ratio"] <= GOAL_TIME))
        print(goal_line(f"{rec['size']}: extra peak memory with EA {100 * rec['rss_extra']:.1f}% (RSS), "
                        f"{100 * rec['alloc_extra']:.1f}% (tour allocations) <= {100 * GOAL_MEMORY:.0f}%",
                        max(rec["rss_extra"], rec["alloc_extra"]) <= GOAL_MEMORY))
    print(f"total time {time.perf_counter() - start:.0f} s")
    write_json(args.json, {"benchmark": "ea_tour", "views": args.views, "results": records})


if __name__ == "__main__":
    main()
