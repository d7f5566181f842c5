"""What torch.compile gives on this machine: a whole tour and training steps, eager against compiled, side by side.

Tours: the bundled model (or --model), --views views at its size, eager and compiled tours interleaved after one
warm-up each (the compiled warm-up is the compile, timed apart). Training: the bundled architecture's stage 1 and
stage 2 in this process (no Ray) on a small procedural dataset, eager then compiled; samples/s between the stamps of
the steps after --skip (so the compile is left out, and reported apart as the first steps' extra time).
Run: python bench/compile_speedup.py [--mode default] [--views 4] [--steps 10] [--repeats 3] [--train-steps 12]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
from common import format_table, median, write_json

from diffpano.data.manifest import commit_clips
from diffpano.data.procedural.build import ProceduralSpec, render_clips
from diffpano.geometry.trajectories import walk
from diffpano.pipelines.compiling import COMPILE_MODES, compile_pipeline, uncompile_module
from diffpano.pipelines.loading import load_model
from trainer.config import load_config
from trainer.run import train

PROMPT = "a cozy living room with a grey sofa, a wooden floor and large windows"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffpano/assets/model")
    p.add_argument("--mode", default="default", choices=[m for m in COMPILE_MODES if m != "off"])
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="sampler steps of a tour")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=12, help="optimiser steps per stage")
    p.add_argument("--skip", type=int, default=4, help="first steps left out of the training rate")
    p.add_argument("--parts", nargs="+", default=["tours", "training"], choices=["tours", "training"])
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def tours(args: argparse.Namespace) -> dict:
    """Seconds per tour, eager and compiled, interleaved; and the compile's warm-up time."""
    pipe = load_model(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)

    def tour() -> float:
        started = time.perf_counter()
        pipe(PROMPT, walk(args.views, spacing=0.5), num_inference_steps=args.steps, seed=0)
        return time.perf_counter() - started

    eager_warm = tour()
    compile_pipeline(pipe, args.mode)
    compiled_warm = tour()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        uncompile_module(pipe.unet)
        times["eager"].append(tour())
        compile_pipeline(pipe, args.mode)  # the compiled graphs stay cached by dynamo: no second compile
        times["compiled"].append(tour())
    return {"eager_s": median(times["eager"]), "compiled_s": median(times["compiled"]), "runs": times,
            "first_compiled_s": compiled_warm, "first_eager_s": eager_warm}


def rates(metrics_csv: Path, per_step: int, skip: int) -> tuple[float, float]:
    """(samples/s after `skip` steps, seconds of the first `skip` steps)."""
    rows = list(csv.DictReader(metrics_csv.open()))
    stamps = [float(r["time"]) for r in rows]
    steps = int(rows[-1]["step"]) - int(rows[skip - 1]["step"])
    return steps * per_step / (stamps[-1] - stamps[skip - 1]), stamps[skip - 1] - stamps[0]


def training(args: argparse.Namespace) -> dict:
    """Stage-1 panoramas/s and stage-2 views/s of the bundled architecture, eager and compiled."""
    work = Path(tempfile.mkdtemp(prefix="diffpano-bench-compile-"))
    spec = ProceduralSpec(scenes=2, clips_per_scene=2, frames=6, height=128, width=256, seed=3)
    for s in range(spec.scenes):
        commit_clips(str(work / "ds"), render_clips(spec, s, list(range(spec.clips_per_scene))))
    batch, tours_per_step, views = 4, 1, 4
    out = {}
    for mode in ("off", args.mode):
        cfg = load_config("trainer/configs/bundled.yaml", [
            f"data.dataset={work / 'ds'}", "scaling.num_workers=0", f"stage1.steps={args.train_steps}",
            f"stage2.steps={args.train_steps}", f"stage1.batch_size={batch}", f"stage2.batch_size={tours_per_step}",
            f"stage2.views={views}", "run.log_every=1", f"run.checkpoint_every={args.train_steps}",
            "run.sample_steps=1", "vae.steps=1", f"optim.compile={mode}", "data.cache_actors=0"])
        train(cfg, [0, 1, 2], mode, str(work / "runs"), local_device="cpu")
        logs = work / "runs" / mode / "logs"
        r1, c1 = rates(logs / "stage1" / "metrics.csv", batch, args.skip)
        r2, c2 = rates(logs / "stage2" / "metrics.csv", tours_per_step * views, args.skip)
        out[mode] = {"stage1_panoramas_per_s": r1, "stage2_views_per_s": r2, "stage1_first_steps_s": c1,
                     "stage2_first_steps_s": c2}
    return out


def main() -> None:
    """Measure tours and training, eager and compiled, and print the ratios."""
    args = parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, mode {args.mode}", flush=True)
    results: dict = {"mode": args.mode}
    if "tours" in args.parts:
        t = results["tours"] = tours(args)
        print(format_table(["tour", "eager s", "compiled s", "speed-up", "first compiled tour s (compile)"], [[
            f"{args.views} views, {args.steps} steps", f"{t['eager_s']:.2f}", f"{t['compiled_s']:.2f}",
            f"{t['eager_s'] / t['compiled_s']:.2f}x", f"{t['first_compiled_s']:.0f}"]]), flush=True)
    if "training" in args.parts:
        results["training"] = training(args)
        print_training(results["training"], args)
    write_json(args.json, results)


def print_training(tr: dict, args: argparse.Namespace) -> None:
    """The training table: eager and compiled rates, the speed-up, the first steps' time (the compile)."""
    e, c = tr["off"], tr[args.mode]
    rows = [[name, f"{e[key]:.2f}", f"{c[key]:.2f}", f"{c[key] / e[key]:.2f}x", f"{c[first]:.0f} / {e[first]:.0f}"]
            for name, key, first in (("stage 1 panoramas/s", "stage1_panoramas_per_s", "stage1_first_steps_s"),
                                     ("stage 2 views/s", "stage2_views_per_s", "stage2_first_steps_s"))]
    print(format_table(["training (bundled arch, 128x256)", "eager", "compiled", "speed-up",
                        f"first {args.skip} steps s, compiled / eager"], rows))


if __name__ == "__main__":
    main()
