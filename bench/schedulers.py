"""Compare samplers on the bundled model: prompt adherence, multi-view consistency and seconds per tour, side by side.

Default: DPM-Solver++ (2M) at 15 and 20 steps against DDIM at 30 (the v0.2 default), CFG 7.5, 128x256, CPU.
- adherence: the model card's prompts (12 wall colours x 6 room types, prompt i of the 72 with seed i); by default
  the 36 with (colour + room) even, so each colour appears 3 times and each room type 6 times; one panorama each,
  scored by the shipped adherence classifier (chance: wall colour 1/12, room type 1/6);
- consistency: epipolar error between neighbouring views of held-out walks (procedural scenes of seed 1, 4 views),
  over the same error against the next walk's views (unrelated; a model whose views ignore each other scores ~1),
  and the epipolar score of diffpano.metrics.consistency.epipolar_consistency;
- seconds per 4-view tour: the consistency tours, timed one by one; samplers interleaved so load hits all alike.
Run: python bench/schedulers.py [--prompts 36|72] [--tours 4] [--out outputs/bench-schedulers]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from diffpano.data.procedural.build import ProceduralSpec, render_clips
from diffpano.defaults import DEFAULT_GUIDANCE
from diffpano.geometry.trajectories import walk
from diffpano.metrics.adherence import load_classifier, parse_prompt, predict, prompts_grid
from diffpano.metrics.consistency import epipolar_consistency
from diffpano.pipelines.loading import resolve_model
from diffpano.pipelines.schedulers import SCHEDULER_NAMES

DEFAULT_CONFIGS = ("ddim:30", "dpmpp-2m:15", "dpmpp-2m:20")
ROOMS = 6


def parse_configs(specs: list[str]) -> list[tuple[str, int]]:
    """(scheduler name, steps) of 'name:steps' strings."""
    out = []
    for spec in specs:
        name, _, steps = spec.partition(":")
        if name not in SCHEDULER_NAMES or not steps.isdigit():
            raise SystemExit(f"--configs: expected name:steps with a name from {SCHEDULER_NAMES}, got {spec!r}")
        out.append((name, int(steps)))
    return out


def chosen_prompts(count: int) -> list[tuple[int, str]]:
    """(index in the card's 72, prompt): all 72, or the 36 with (colour + room) even."""
    grid = prompts_grid()
    if count == len(grid):
        return list(enumerate(grid))
    return [(i, p) for i, p in enumerate(grid) if (i // ROOMS + i % ROOMS) % 2 == 0]


def held_out_tours(count: int, views: int, height: int, width: int) -> list[tuple[list[str], np.ndarray]]:
    """(captions, poses (V, 4, 4)) of `count` walks through procedural scenes of seed 1 (two walks a scene)."""
    spec = ProceduralSpec(scenes=math.ceil(count / 2), clips_per_scene=2, frames=views, height=height, width=width,
                     seed=1, depth=False)
    clips = [c for s in range(spec.scenes) for c in render_clips(spec, s, [0, 1])][:count]
    return [(list(c.captions), c.poses.astype(np.float64)) for c in clips]


def hits(classifier, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: room type right, wall colour right (booleans)."""
    rooms, walls = predict(classifier, images)
    wanted = [parse_prompt(p) for p in prompts]
    return (np.array([r == w for (w, _), r in zip(wanted, rooms, strict=True)]),
            np.array([c == w for (_, w), c in zip(wanted, walls, strict=True)]))


def summarise(configs, prompts, panoramas, tours, images, seconds, classifier) -> list[dict]:
    """One row per sampler over what has been generated so far (prompts and walks in the same order for all)."""
    texts = [p for _, p in prompts][: sum(len(x) for x in panoramas[configs[0]])]
    rows, ref = [], None
    for config in configs:
        room, wall = hits(classifier, np.concatenate(panoramas[config]), texts)
        ref = ref or (room, wall)
        done = images[config]
        per_tour = [epipolar_consistency(x, p, unrelated=done[(j + 1) % len(done)])
                    for j, (x, (_, p)) in enumerate(zip(done, tours, strict=False))] if len(done) > 1 else []
        own = float(np.mean([r["epipolar_error"] for r in per_tour])) if per_tour else math.nan
        unrelated = float(np.mean([r["epipolar_error_unrelated"] for r in per_tour])) if per_tour else math.nan
        rows.append({
            "scheduler": config[0], "steps": config[1], "prompts": len(texts), "tours": len(done),
            "wall_accuracy": float(wall.mean()), "room_accuracy": float(room.mean()),
            # paired with the reference (same prompts and seeds): prompts right here and wrong there, and the reverse
            "wall_gained_lost": [int((wall & ~ref[1]).sum()), int((~wall & ref[1]).sum())],
            "room_gained_lost": [int((room & ~ref[0]).sum()), int((~room & ref[0]).sum())],
            "epipolar_error": own, "epipolar_error_unrelated": unrelated, "epipolar_vs_unrelated": own / unrelated,
            "epipolar_vs_unrelated_per_tour": [r["epipolar_error"] / r["epipolar_error_unrelated"] for r in per_tour],
            "epipolar_score": float(np.mean([r["epipolar_score"] for r in per_tour])) if per_tour else math.nan,
            "tour_seconds_median": float(np.median(seconds[config])) if seconds[config] else math.nan,
            "tour_seconds": seconds[config],
        })
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| sampler | steps | wall colour | room type | neighbours / unrelated | epipolar score | s / tour |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {r['steps']} | {r['wall_accuracy']:.3f} | {r['room_accuracy']:.3f} | "
                     f"{r['epipolar_vs_unrelated']:.3f} | {r['epipolar_score']:.3f} | {r['tour_seconds_median']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    """Run every sampler on the same prompts, seeds and walks, in stages; after each, write JSON and a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="name:steps, first = reference")
    parser.add_argument("--prompts", type=int, choices=(36, 72), default=36)
    parser.add_argument("--tours", type=int, default=4)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--size", default="128x256")
    parser.add_argument("--out", default="outputs/bench-schedulers")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    configs = parse_configs(args.configs)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    started = time.perf_counter()
    pipe = resolve_model(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    gen = dict(height=h, width=w, guidance_scale=args.guidance)
    pipe(["warm-up"] * 2, walk(2), seed=0, num_inference_steps=2, **gen)

    prompts = chosen_prompts(args.prompts)
    tours = held_out_tours(args.tours, args.views, h, w)
    panoramas: dict[tuple[str, int], list[np.ndarray]] = {c: [] for c in configs}
    images: dict[tuple[str, int], list[np.ndarray]] = {c: [] for c in configs}
    seconds: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    chunks = [prompts[i : i + 12] for i in range(0, len(prompts), 12)]
    # stages alternate a chunk of prompts and two walks, so a run cut short still measures both
    stages = max(len(chunks), math.ceil(len(tours) / 2))
    for stage in range(stages):
        for chunk in chunks[stage : stage + 1]:
            poses = np.stack([walk(1).numpy()] * len(chunk))
            for name, steps in configs:
                out = pipe([[p] for _, p in chunk], poses, seed=[k for k, _ in chunk], scheduler=name,
                           num_inference_steps=steps, **gen)
                panoramas[(name, steps)].append(out.images[:, 0])
        for k in range(2 * stage, min(2 * stage + 2, len(tours))):
            captions, poses = tours[k]
            for name, steps in configs:
                t0 = time.perf_counter()
                out = pipe(captions, poses, seed=k, scheduler=name, num_inference_steps=steps, **gen)
                seconds[(name, steps)].append(time.perf_counter() - t0)
                images[(name, steps)].append(out.images[0])
        rows = summarise(configs, prompts, panoramas, tours, images, seconds, classifier)
        wall = time.perf_counter() - started
        results = {"model": pipe.model_name, "size": [h, w], "guidance": args.guidance, "views": args.views,
                   "prompts": rows[0]["prompts"], "tours": rows[0]["tours"], "wall_seconds": wall, "rows": rows}
        (out_dir / "schedulers.json").write_text(json.dumps(results, indent=2))
        print(f"\nstage {stage + 1}/{stages}: {rows[0]['prompts']} prompts (chance: wall 1/12, room 1/6), "
              f"{rows[0]['tours']} walks of {args.views} views, CFG {args.guidance}, {h}x{w}, {wall:.0f} s so far\n"
              f"{table(rows)}", flush=True)


if __name__ == "__main__":
    main()
