"""Measure a DiffPano model against the bundled-model goals: speed, prompt adherence, seam, multi-view consistency.

Figures (held-out: prompts built from the 12 colours x 6 room types, and clips of a dataset built with another seed):
- seconds for a 4-view tour at 128x256 with the CLI defaults (30 steps, CFG 7.5) on this machine;
- wall-colour and room-type accuracy of the shipped adherence classifier on one panorama per prompt;
- seam: colour jump between the last and first column / mean interior jump, median over views (goal <= 1);
- consistency: epipolar error between neighbouring views of held-out tours, over the same error against views of
  unrelated tours (goal <= 0.6) and over the error of the same model with its EA modules off (goal <= 0.8);
- an S x K grid of the same model (inference-time reference views K and samples S);
- the model card's pictures: heldout_tours.png (6 held-out tours) and prompt_grid.png (the first 24 prompts).
Run: python scripts/measure_bundled_model.py --heldout outputs/dataset-heldout [--model DIR] [--out DIR]
     [--pictures-only] (only the two pictures, same prompts, tours and seeds: no figures.json)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffpano.data.procedural.materials import WALL_COLOURS
from diffpano.defaults import DEFAULT_GUIDANCE
from diffpano.geometry.trajectories import walk
from diffpano.metrics.adherence import adherence, load_classifier, predict, prompt_panoramas, prompts_grid
from diffpano.metrics.consistency import neighbours_and_unrelated
from diffpano.metrics.evaluation import select_eval_tours
from diffpano.metrics.images import float_images
from diffpano.metrics.report import tour_grid
from diffpano.metrics.seam import column_jumps
from diffpano.pipelines.loading import resolve_model

GOALS = {"tour_seconds": 30.0, "wall_accuracy": 0.80, "room_accuracy": 0.70, "seam_colour_ratio_median": 1.0,
         "epipolar_vs_unrelated": 0.6, "epipolar_vs_no_ea": 0.8}
PICTURE_TOURS, PICTURE_PROMPTS = 6, 24  # held-out tours and prompts (4 to a row) the model card's pictures show


def seam_ratios(images: np.ndarray) -> np.ndarray:
    """Per view: seam colour jump / mean interior column jump."""
    colour, _ = column_jumps(float_images(images))
    return (colour[:, -1] / (colour[:, :-1].mean(-1) + 1e-8)).numpy()


def write_pictures(out: Path, images: np.ndarray, prompts: list[str], tours: list[np.ndarray], held: list) -> None:
    """The model card's pictures: the first held-out tours, and the first prompts' panoramas 4 to a row."""
    tour_grid([(x, t.prompts) for x, t in zip(tours, held, strict=False)], str(out / "heldout_tours.png"),
              max_tours=PICTURE_TOURS)
    tour_grid([(images[i : i + 4], [" | ".join(prompts[i : i + 4])]) for i in range(0, PICTURE_PROMPTS, 4)],
              str(out / "prompt_grid.png"), max_tours=PICTURE_PROMPTS // 4)


def main() -> None:
    """Run every measurement, print a table with the goals, write JSON and a picture grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--heldout", required=True, help="dataset of held-out scenes (docs/datasets.md)")
    parser.add_argument("--out", default="outputs/bundled-eval")
    parser.add_argument("--tours", type=int, default=8, help="held-out tours for consistency")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--size", default="128x256")
    parser.add_argument("--skip-grid", action="store_true", help="leave out the S x K grid")
    parser.add_argument("--pictures-only", action="store_true",
                        help="only write heldout_tours.png and prompt_grid.png (no measurements, no figures.json)")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    pipe = resolve_model(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    gen = dict(height=h, width=w, num_inference_steps=args.steps, guidance_scale=args.guidance)
    if args.pictures_only:
        prompts = prompts_grid()[:PICTURE_PROMPTS]
        # The same selection as a full run (it depends on --tours), of which the pictures show the first tours.
        held = select_eval_tours(args.heldout, args.tours, args.views, seed=0, load=False)[:PICTURE_TOURS]
        tours = [pipe(t.prompts, t.poses, seed=t.seed, **gen).images[0] for t in held]
        write_pictures(out, prompt_panoramas(pipe, prompts, **gen), prompts, tours, held)
        return
    results: dict = {"model": pipe.model_name, "size": [h, w], "steps": args.steps, "guidance": args.guidance}

    prompt = "A bedroom with blue walls and a wooden floor. A white bed stands under the window."
    pipe([prompt] * 4, walk(4), seed=0, **gen)  # warm-up
    started = time.perf_counter()
    pipe([prompt] * 4, walk(4), seed=1, **gen)
    results["tour_seconds"] = time.perf_counter() - started

    prompts = prompts_grid()
    images = prompt_panoramas(pipe, prompts, **gen)
    adh = adherence(load_classifier(), images, prompts)
    results |= {"wall_accuracy": adh["wall_accuracy"], "room_accuracy": adh["room_accuracy"],
                "adherence_prompts": len(prompts)}
    per_colour = {}
    _, walls = predict(load_classifier(), images)
    for colour in WALL_COLOURS:
        idx = [i for i, p in enumerate(prompts) if f" {colour} walls" in p]
        per_colour[colour] = float(np.mean([walls[i] == colour for i in idx]))
    results["wall_accuracy_per_colour"] = per_colour

    held = select_eval_tours(args.heldout, args.tours, args.views, seed=0, load=False)
    with_ea, without_ea = [], []
    for t in held:
        with_ea.append(pipe(t.prompts, t.poses, seed=t.seed, **gen).images[0])
        without_ea.append(pipe(t.prompts, t.poses, seed=t.seed, use_epipolar=False, **gen).images[0])
    poses = [t.poses for t in held]
    err, err_unrelated = neighbours_and_unrelated(with_ea, poses)
    err_no_ea, _ = neighbours_and_unrelated(without_ea, poses)
    seams = seam_ratios(np.concatenate([images, *with_ea]))
    results |= {"epipolar_error": err, "epipolar_error_unrelated": err_unrelated, "epipolar_error_no_ea": err_no_ea,
                "epipolar_vs_unrelated": err / err_unrelated, "epipolar_vs_no_ea": err / err_no_ea,
                "seam_colour_ratio_median": float(np.median(seams)), "seam_views": len(seams)}

    if not args.skip_grid:
        grid = []
        for k, s in itertools.product((1, 2), (4, 8)):
            tours = [pipe(t.prompts, t.poses, seed=t.seed, num_ref_views=k, num_samples=s, **gen).images[0]
                     for t in held[:4]]
            e, _ = neighbours_and_unrelated(tours, poses[:4])
            grid.append({"K": k, "S": s, "epipolar_error": e})
        results["sk_grid"] = grid

    write_pictures(out, images, prompts, with_ea, held)
    (out / "figures.json").write_text(json.dumps(results, indent=2))
    for key, goal in GOALS.items():
        value = results[key]
        met = value >= goal if key.endswith("accuracy") else value <= goal
        print(f"{key:28s} {value:8.3f}   goal {'>=' if key.endswith('accuracy') else '<='} {goal}   "
              f"{'met' if met else 'NOT met'}")
    print(json.dumps({k: v for k, v in results.items() if k not in GOALS}, indent=1))


if __name__ == "__main__":
    main()
