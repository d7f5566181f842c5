"""Measure tours made on a geometry proxy (docs/guide/generate.md) at several img2img strengths, against no proxy.

Each condition, same seeds: no proxy (pure generation at the same poses), and a proxy at each strength (1.0 included,
where the render still tints the first noisy latents; 0 is the render through the VAE, nothing denoised). The proxy
renders themselves are scored as the control.
- adherence: the model card's 72 prompts, one panorama each, on a house laid out as the prompt says (`--layout`,
  the prompt's seed); wall-colour and room-type accuracy of the shipped adherence classifier;
- restyle: the same, on the same house with walls of another colour (6 along the 12 of the palette): how often the
  walls take the prompt's colour and how often they keep the render's;
- held-out walks (a dataset of renders, e.g. `make outputs/dataset-heldout`): the renders are the proxy; epipolar
  error of neighbouring views over the same against the next tour's views (unrelated), and reprojection PSNR
  between neighbouring views through the renders' depth;
- loop closure: 16-view orbits in laid-out houses (one prompt per room type); the closing pair's epipolar error
  over the neighbouring pairs' (diffpano.metrics.consistency.loop_closure) and its any-pair control;
- seam: DS at the seam over DS inside (all generated views);
- how close each view stays to its render: PSNR and SSIM (LPIPS needs AlexNet weights, not on this machine).
Run: python scripts/measure_geometry.py --heldout outputs/dataset-heldout [--out outputs/geometry-eval]
     [--parts adherence restyle heldout orbits] [--prompts 72] [--tours 8] [--orbits 6] [--strengths 0 0.4 0.6 0.8 1.0]
     (a run of some parts replaces those parts in OUT/figures.json and keeps the others)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffpano.data.procedural.prompts import COLOURS
from diffpano.data.procedural.scene_mesh import SceneMeshRenderer
from diffpano.data.procedural.scenes import generate_scene
from diffpano.data.procedural.walks import room_orbit
from diffpano.data.proxy import layout_of, layout_proxy, rendered
from diffpano.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from diffpano.metrics.adherence import adherence, load_classifier, predict, prompts_grid
from diffpano.metrics.consistency import loop_closure, neighbours_and_unrelated, reprojection_scores
from diffpano.metrics.evaluation import select_eval_tours
from diffpano.metrics.paired import paired_metrics
from diffpano.metrics.report import tour_grid
from diffpano.metrics.seam import discontinuity_scores
from diffpano.pipelines.loading import resolve_model

RENDERS, NO_PROXY = "renders (control)", "no proxy"
BATCH = 12  # one-view tours per pipeline call
PARTS = ("adherence", "restyle", "heldout", "orbits")
GRID_ROWS = 6  # prompts the picture shows, one per room type
ROOM_TYPE_PROMPTS = [13 * i for i in range(GRID_ROWS)]  # prompts_grid()[13 i]: colour 2 i, room type i


def nchw(images: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 as (N, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images.reshape(-1, *images.shape[-3:]))).permute(0, 3, 1, 2)


def generate(pipe, prompts: list, poses: np.ndarray, seeds: list[int], renders: np.ndarray, strength: float | None,
             gen: dict) -> tuple[np.ndarray, float]:
    """Tours (B, N, H, W, 3) from the renders at strength (None: no proxy), in chunks of BATCH tours, and seconds."""
    out, started = [], time.perf_counter()
    for i in range(0, len(prompts), BATCH):
        proxy = {} if strength is None else {"image": renders[i : i + BATCH], "strength": strength}
        out.append(pipe(prompts[i : i + BATCH], poses[i : i + BATCH], seed=seeds[i : i + BATCH], **proxy,
                        **gen).images)
    return np.concatenate(out), time.perf_counter() - started


def to_render(images: np.ndarray, renders: np.ndarray) -> dict:
    """PSNR and SSIM (circular) of every view against its render."""
    m = paired_metrics(nchw(images), nchw(renders))
    return {"psnr_to_render": m["psnr_capped"], "ssim_to_render": m["ssim"]}


def run_conditions(pipe, conditions: dict, prompts: list, poses: np.ndarray, seeds: list[int], renders: np.ndarray,
                   gen: dict, per: str) -> tuple[dict, dict]:
    """Every condition's tours from the same prompts, poses and seeds, with seconds per `per` (a tour of the batch)
    and closeness to the render; the images by condition, the renders among them as the control."""
    images, results = {RENDERS: renders}, {}
    for name, strength in conditions.items():
        images[name], seconds = generate(pipe, prompts, poses, seeds, renders, strength, gen)
        results[name] = {f"seconds_per_{per}": seconds / len(prompts)} | to_render(images[name], renders)
    return results, images


def adherence_part(pipe, conditions: dict, prompts: list[str], size: tuple[int, int], gen: dict) -> tuple[dict, dict]:
    """Adherence and closeness to the render of one panorama per prompt, on a house laid out as it says."""
    proxies = [layout_proxy(i, *size, 1, 1.0, *layout_of(p)) for i, p in enumerate(prompts)]
    renders, poses = np.stack([p.rgb for p in proxies]), np.stack([p.poses for p in proxies])
    results, images = run_conditions(pipe, conditions, [[p] for p in prompts], poses, list(range(len(prompts))),
                                     renders, gen, "panorama")
    classifier = load_classifier()
    for name, x in images.items():
        results.setdefault(name, {}).update(adherence(classifier, x[:, 0], prompts))
    return results, images


def restyle_part(pipe, conditions: dict, prompts: list[str], size: tuple[int, int], gen: dict) -> dict:
    """Per condition with a proxy: the share of panoramas whose walls take the prompt's colour, and the share that
    keep the render's, on houses whose walls are another colour than the prompt's (6 along the palette)."""
    other = {c: COLOURS[(i + len(COLOURS) // 2) % len(COLOURS)] for i, c in enumerate(COLOURS)}
    layouts = [layout_of(p) for p in prompts]
    proxies = [layout_proxy(i, *size, 1, 1.0, kind, other[wall], floor) for i, (kind, wall, floor)
               in enumerate(layouts)]
    renders, poses = np.stack([p.rgb for p in proxies]), np.stack([p.poses for p in proxies])
    classifier, results = load_classifier(), {}
    wanted = np.array([wall for _, wall, _ in layouts])
    rendered_walls = np.array([other[w] for w in wanted])
    for name, strength in [(RENDERS, None), *((n, s) for n, s in conditions.items() if s is not None)]:
        x = renders if name == RENDERS else generate(pipe, [[p] for p in prompts], poses, list(range(len(prompts))),
                                                     renders, strength, gen)[0]
        walls = np.array(predict(classifier, x[:, 0])[1])
        results[name] = {"restyle_prompt_wall": float(np.mean(walls == wanted)),
                         "restyle_render_wall": float(np.mean(walls == rendered_walls))}
    return results


def heldout_part(pipe, conditions: dict, heldout: str, tours: int, views: int, gen: dict) -> tuple[dict, dict]:
    """Epipolar and reprojection consistency, and closeness to the render, of held-out walks with their renders."""
    held = select_eval_tours(heldout, tours, views, seed=0, load=True)
    renders, depths = np.stack([t.rgb for t in held]), np.stack([t.depth for t in held])
    poses = np.stack([t.poses for t in held])
    results, images = run_conditions(pipe, conditions, [t.prompts for t in held], poses, [t.seed for t in held],
                                     renders, gen, "tour")
    for name, x in images.items():
        own, unrelated = neighbours_and_unrelated(list(x), list(poses))
        reproj = [reprojection_scores(t, d, p)["reprojection_psnr"] for t, d, p in zip(x, depths, poses, strict=True)]
        results.setdefault(name, {}).update({
            "epipolar_error": own, "epipolar_error_unrelated": unrelated, "epipolar_vs_unrelated": own / unrelated,
            "reprojection_psnr": float(np.mean([r for r in reproj if r is not None]))})
    return results, images


def orbit_part(pipe, conditions: dict, prompts: list[str], views: int, size: tuple[int, int],
               gen: dict) -> tuple[dict, dict]:
    """Loop closure of closed orbits in houses laid out as the prompts say, and closeness to the render."""
    proxies = [rendered(SceneMeshRenderer(scene), room_orbit(scene, views), *size)
               for scene in (generate_scene(100 + i, *layout_of(p)) for i, p in enumerate(prompts))]
    renders, poses = np.stack([p.rgb for p in proxies]), np.stack([p.poses for p in proxies])
    results, images = run_conditions(pipe, conditions, [[p] * views for p in prompts], poses,
                                     list(range(len(prompts))), renders, gen, "orbit")
    for name, x in images.items():
        closures = [loop_closure(t, p) for t, p in zip(x, poses, strict=True)]
        results.setdefault(name, {}).update({key: float(np.mean([c[key] for c in closures]))
                                             for key in ("ratio", "control", "closing", "neighbours")})
    return results, images


def seam(*parts: dict) -> dict:
    """Per condition: DS at the seam over DS inside, over every view of every part."""
    out = {}
    for name in parts[0]:
        x = np.concatenate([part[name].reshape(-1, *part[name].shape[-3:]) for part in parts])
        ds = discontinuity_scores(nchw(x))
        out[name] = {"seam_ds": ds["seam_ds"], "seam_ds_interior": ds["seam_ds_interior"],
                     "seam_ratio": ds["seam_ds"] / ds["seam_ds_interior"]}
    return out


ROWS = [  # (part, key, label, format)
    ("adherence", "wall_accuracy", "wall colour right ({prompts} prompts)", "{:.3f}"),
    ("adherence", "room_accuracy", "room type right ({prompts} prompts)", "{:.3f}"),
    ("adherence", "psnr_to_render", "PSNR to the render, dB ({prompts} prompts)", "{:.1f}"),
    ("adherence", "ssim_to_render", "SSIM to the render ({prompts} prompts)", "{:.3f}"),
    ("restyle", "restyle_prompt_wall", "restyle: walls take the prompt's colour ({prompts} prompts)", "{:.3f}"),
    ("restyle", "restyle_render_wall", "restyle: walls keep the render's colour", "{:.3f}"),
    ("heldout", "epipolar_vs_unrelated", "epipolar error, neighbours / unrelated ({tours} held-out walks)", "{:.3f}"),
    ("heldout", "reprojection_psnr", "reprojection PSNR between neighbours through depth, dB", "{:.2f}"),
    ("heldout", "psnr_to_render", "PSNR to the render, dB ({tours} held-out walks)", "{:.1f}"),
    ("orbits", "ratio", "loop closure: closing / neighbours ({orbits} orbits of {orbit_views} views)", "{:.3f}"),
    ("orbits", "control", "loop closure control: any pair / the others", "{:.3f}"),
    ("seam", "seam_ratio", "seam DS / interior DS (all views)", "{:.3f}"),
    ("heldout", "seconds_per_tour", "seconds per {views}-view tour", "{:.1f}"),
]


def table(results: dict, names: list[str]) -> str:
    """The figures as a Markdown table, one column per condition."""
    lines = ["| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for part, key, label, fmt in ROWS:
        cells = [results.get(part, {}).get(n, {}).get(key) for n in names]
        values = " | ".join("—" if c is None else fmt.format(c) for c in cells)
        lines.append(f"| {label.format(**results['counts'])} | {values} |")
    return "\n".join(lines)


def picture(path: Path, prompts: list[str], images: dict, names: list[str]) -> None:
    """One row per room type: the render, then the panorama of each condition."""
    rows = [i for i in ROOM_TYPE_PROMPTS if i < len(prompts)]
    tour_grid([(np.stack([images[n][i, 0] for n in names]),
                [f"{prompts[i]}  ({' | '.join(names)})"]) for i in rows], str(path), max_tours=GRID_ROWS,
              max_views=len(names))


def main() -> None:
    """Run the parts asked for, every condition; write figures.json, table.md and the picture; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--heldout", required=True, help="dataset of held-out renders with depth (docs/datasets.md)")
    parser.add_argument("--out", default="outputs/geometry-eval")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--prompts", type=int, default=72, help="the first N of the card's 72 prompts")
    parser.add_argument("--tours", type=int, default=8, help="held-out walks")
    parser.add_argument("--views", type=int, default=4, help="views per held-out walk")
    parser.add_argument("--orbits", type=int, default=6, help="orbits, one prompt per room type (at most 6)")
    parser.add_argument("--orbit-views", type=int, default=16)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--size", default="128x256")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    pipe = resolve_model(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    gen = dict(height=size[0], width=size[1], num_inference_steps=args.steps, guidance_scale=args.guidance)
    conditions = {NO_PROXY: None} | {f"strength {s:g}": s for s in sorted(args.strengths)}
    prompts = prompts_grid()[: args.prompts]
    names = [RENDERS, *list(conditions)[1:], NO_PROXY]
    started = time.perf_counter()
    figures = out / "figures.json"
    results = json.loads(figures.read_text()) if figures.exists() else {}
    results |= {"model": pipe.model_name, "size": list(size), "steps": args.steps, "guidance": args.guidance,
                "counts": {"prompts": len(prompts), "tours": args.tours, "views": args.views,
                           "orbits": min(args.orbits, GRID_ROWS), "orbit_views": args.orbit_views}}
    results.pop("seam", None)  # over the image parts of one run only
    images = {}
    if "adherence" in args.parts:
        results["adherence"], images["adherence"] = adherence_part(pipe, conditions, prompts, size, gen)
        picture(out / "geometry_grid.png", prompts, images["adherence"], names)
        figures.write_text(json.dumps(results, indent=2))
        print(f"adherence done ({time.perf_counter() - started:.0f} s)", flush=True)
    if "restyle" in args.parts:
        results["restyle"] = restyle_part(pipe, conditions, prompts, size, gen)
        figures.write_text(json.dumps(results, indent=2))
        print(f"restyle done ({time.perf_counter() - started:.0f} s)", flush=True)
    if "heldout" in args.parts:
        results["heldout"], images["heldout"] = heldout_part(pipe, conditions, args.heldout, args.tours, args.views,
                                                             gen)
        figures.write_text(json.dumps(results, indent=2))
        print(f"held-out walks done ({time.perf_counter() - started:.0f} s)", flush=True)
    if "orbits" in args.parts:
        orbit_prompts = [prompts_grid()[i] for i in ROOM_TYPE_PROMPTS[: args.orbits]]
        results["orbits"], images["orbits"] = orbit_part(pipe, conditions, orbit_prompts, args.orbit_views, size,
                                                         gen)
        figures.write_text(json.dumps(results, indent=2))
        print(f"orbits done ({time.perf_counter() - started:.0f} s)", flush=True)
    if {"adherence", "heldout", "orbits"} <= set(args.parts):
        results["seam"] = seam(*images.values())
    figures.write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table(results, names) + "\n")
    print(table(results, names))
    print(f"total {time.perf_counter() - started:.0f} s -> {out}")


if __name__ == "__main__":
    main()
