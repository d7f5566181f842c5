"""Loop closure of a closed orbit: the epipolar error of the closing pair (last -> first view) over neighbouring pairs.

A tour that returns to its start should close: its last view should agree with its first as well as neighbours agree.
Compares windows of 8 views (4 of them context) with the default window, on the bundled model, same prompts and seeds.
Goal: ratio <= 1.15 with the default window. Run: python bench/loop_closure.py [--views 16] [--prompts 3] [--seeds 1]
[--default-only] [--json P]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import format_table, goal_line, write_json

from diffpano.defaults import WINDOW_VIEWS
from diffpano.geometry.trajectories import orbit
from diffpano.metrics.consistency import loop_closure
from diffpano.pipelines.loading import load_model

GOAL = 1.15
PROMPTS = ["a cozy living room with a grey sofa and a wooden floor", "a bright kitchen with white cabinets",
           "a bedroom with blue walls and a large bed", "an office with a desk and bookshelves",
           "a bathroom with green tiles", "a dining room with a long table"]


def main() -> None:
    """Generate the orbit with both windows, print the table and the goal verdict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=16, help="views of the closed orbit (default 16)")
    p.add_argument("--radius", type=float, default=1.5, help="orbit radius, metres (default 1.5)")
    p.add_argument("--prompts", type=int, default=3, help=f"prompts (1-{len(PROMPTS)}, default 3)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (default 1)")
    p.add_argument("--default-only", action="store_true", help="only the default window (not windows of 8)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the library's)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    start = time.perf_counter()
    pipe = load_model("diffpano/assets/model")
    pipe.set_progress_bar_config(disable=True)
    poses = orbit(args.views, radius=args.radius)
    windows = {"8 (4 context)": dict(window_views=8, window_context=4), f"default ({WINDOW_VIEWS})": {}}
    if args.default_only:
        windows.pop("8 (4 context)")
    steps = {} if args.steps is None else {"num_inference_steps": args.steps}
    results = {name: [] for name in windows}
    cases = [(i, prompt, seed) for i, prompt in enumerate(PROMPTS[: args.prompts]) for seed in range(args.seeds)]
    for i, prompt, seed in cases:
        for name, options in windows.items():
            t0 = time.perf_counter()
            images = pipe(prompt, poses, seed=i + 100 * seed, **options, **steps).images[0]
            rec = loop_closure(images, poses) | {"seconds": time.perf_counter() - t0}
            results[name].append(rec)
            print(f"prompt {i} seed {seed} window {name}: ratio {rec['ratio']:.3f}, control {rec['control']:.3f} "
                  f"({rec['seconds']:.0f} s)", flush=True)
    rows = []
    for name, recs in results.items():
        keys = ("closing", "neighbours", "ratio", "control", "seconds")
        mean = {k: statistics.mean(r[k] for r in recs) for k in keys}
        spread = statistics.stdev(r["ratio"] for r in recs) / len(recs) ** 0.5 if len(recs) > 1 else float("nan")
        rows.append([name, len(recs), mean["closing"], mean["neighbours"], mean["ratio"], spread, mean["control"],
                     mean["seconds"]])
    print(format_table(["window", "tours", "closing-pair error", "neighbour error", "ratio", "± s.e.",
                        "control (any pair)", "s / tour"], rows))
    default = rows[-1][4]
    print(goal_line(f"closing/neighbour ratio {default:.3f} <= {GOAL} with the default window", default <= GOAL))
    print(f"total time {time.perf_counter() - start:.0f} s")
    write_json(args.json, {"benchmark": "loop_closure", "views": args.views, "results": results, "goal": GOAL})


if __name__ == "__main__":
    main()
