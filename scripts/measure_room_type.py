"""Why a model misses room types: the classifier's ceiling, the confusions, and prompts that name the furniture.

Figures:
- the ceiling: room and wall accuracy of the shipped adherence classifier on renders of its own held-out scenes
  (scripts/train_adherence.py's, here at 128x256), and on the same renders through the model's VAE (what a latent
  model that drew the renderer's rooms exactly would score);
- room accuracy and the confusion matrix (wanted -> classified) on the model card's 72 prompts, same seeds;
- the same with the room's usual furniture named in each prompt ("The room contains a bed, a nightstand and ...").
Run: python scripts/measure_room_type.py [--model DIR] [--scenes 100] [--out outputs/room-type]
(about 11 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from diffpano.data.captions import a, listing
from diffpano.data.procedural.furniture import PLANS, SPECS
from diffpano.data.procedural.scenes import ROOM_TYPES
from diffpano.defaults import DEFAULT_GUIDANCE
from diffpano.metrics.adherence import (
    BUNDLED,
    HELD_OUT_SEED_OFFSET,
    AdherenceClassifier,
    load_classifier,
    make_training_set,
    parse_prompt,
    predict,
    prompt_panoramas,
    prompts_grid,
)
from diffpano.pipelines.loading import resolve_model


def usual_furniture(room: str) -> str:
    """'a bed, a nightstand and a wardrobe': the first three kinds of item the room type's plan places."""
    return listing([a(noun) for noun in list(dict.fromkeys(SPECS[key].noun for key, _ in PLANS[room]))[:3]])


def scores(clf: AdherenceClassifier, images: np.ndarray, wanted: list[tuple[str, str]]) -> dict:
    """Room and wall accuracy against (room, wall) labels, with the room confusion matrix."""
    rooms, walls = predict(clf, images)
    confusion = Counter(zip((w[0] for w in wanted), rooms, strict=True))
    recall = [confusion[(w, w)] / n for w in ROOM_TYPES if (n := sum(confusion[(w, g)] for g in ROOM_TYPES))]
    return {"room_accuracy": float(np.mean([r == w[0] for r, w in zip(rooms, wanted, strict=True)])),
            "room_accuracy_per_type_mean": float(np.mean(recall)),
            "wall_accuracy": float(np.mean([c == w[1] for c, w in zip(walls, wanted, strict=True)])),
            "count": len(images),
            "room_confusion": {w: {g: confusion[(w, g)] for g in ROOM_TYPES} for w in ROOM_TYPES}}


def vae_round_trip(pipe, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """uint8 panoramas (N, H, W, 3) encoded to latents and decoded again, as the pipeline does for known views."""
    with torch.no_grad():
        return np.concatenate([pipe._decode(pipe._encode_images(torch.from_numpy(images[i : i + batch])))
                               for i in range(0, len(images), batch)])


def print_confusion(name: str, figure: dict) -> None:
    """The confusion matrix as text, wanted rows against classified columns."""
    print(f"\n{name}: room {figure['room_accuracy']:.3f} (mean over types "
          f"{figure['room_accuracy_per_type_mean']:.3f}), wall {figure['wall_accuracy']:.3f} "
          f"({figure['count']} panoramas); rows wanted, columns classified")
    print(" " * 12 + "".join(f"{g[:8]:>9s}" for g in ROOM_TYPES))
    for w, row in figure["room_confusion"].items():
        print(f"{w:12s}" + "".join(f"{row[g]:9d}" for g in ROOM_TYPES))


def main() -> None:
    """Measure the ceiling and the generated figures, print them, write room_type.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes rendered for the ceiling (4 views)")
    parser.add_argument("--out", default="outputs/room-type")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    args = parser.parse_args()
    torch.set_num_threads(2)
    clf = load_classifier()
    pipe = resolve_model(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)

    held_out_seed = json.loads((BUNDLED / "config.json").read_text())["training"]["seed"] + HELD_OUT_SEED_OFFSET
    renders, room_ids, wall_ids = make_training_set(args.scenes, 4, (128, 256), seed=held_out_seed, progress=True)
    labels = [(clf.rooms[r], clf.colours[c]) for r, c in zip(room_ids, wall_ids, strict=True)]
    results: dict = {"model": pipe.model_name, "steps": args.steps, "guidance": args.guidance,
                     "renders": scores(clf, renders, labels)}
    if pipe.vae is not None:
        round_trip = vae_round_trip(pipe, renders)
        results["renders_through_vae"] = scores(clf, round_trip, labels)
        # Mean absolute error per channel with colours in [0, 1] (training logs L1 in [-1, 1], twice as large).
        results["renders_through_vae"]["round_trip_l1"] = float(np.abs(round_trip / 255 - renders / 255).mean())

    gen = dict(height=128, width=256, num_inference_steps=args.steps, guidance_scale=args.guidance)
    prompts = prompts_grid()
    named = [f"{p} The room contains {usual_furniture(parse_prompt(p)[0])}." for p in prompts]
    for key, batch in (("prompts", prompts), ("prompts_furniture_named", named)):
        results[key] = scores(clf, prompt_panoramas(pipe, batch, **gen), [parse_prompt(p) for p in batch])
        results[key]["example"] = batch[0]

    for key in ("renders", "renders_through_vae", "prompts", "prompts_furniture_named"):
        if key in results:
            print_confusion(key, results[key])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "room_type.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'room_type.json'}")


if __name__ == "__main__":
    main()
