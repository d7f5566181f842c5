"""Train the prompt-adherence classifier (room type, wall colour) on procedural renderings and ship it.

Renders a training set and a held-out set from different scene seeds, trains on one thread by default, prints the
held-out room and wall accuracy and saves the classifier (config.json + model.safetensors) to --out.
Run: python scripts/train_adherence.py [--scenes 1000] [--views 3] [--steps 1000] [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from diffpano.metrics.adherence import (  # noqa: E402
    BUNDLED,
    HELD_OUT_SEED_OFFSET,
    accuracy,
    make_training_set,
    save_classifier,
    train_classifier,
)


def main() -> None:
    """Render, train, evaluate on held-out scenes, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000, help="training scenes (default 1000)")
    parser.add_argument("--views", type=int, default=3, help="views per training scene (default 3)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--held-out", type=int, default=100, help="held-out scenes, 4 views each (default 100)")
    parser.add_argument("--out", type=Path, default=BUNDLED, help=f"classifier directory (default {BUNDLED})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train = make_training_set(args.scenes, args.views, seed=args.seed, progress=True)
    held = make_training_set(args.held_out, 4, seed=args.seed + HELD_OUT_SEED_OFFSET, progress=True)
    render_s = time.perf_counter() - started
    started = time.perf_counter()
    model = train_classifier(*train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             device=args.device)
    train_s = time.perf_counter() - started
    scores = accuracy(model, *held)
    print(f"rendered {len(train[0])} training and {len(held[0])} held-out views in {render_s:.0f} s; "
          f"trained {args.steps} steps in {train_s:.0f} s on {args.threads} thread(s)")
    print(f"held-out room accuracy {scores['room_accuracy']:.3f} (chance 0.167), "
          f"wall accuracy {scores['wall_accuracy']:.3f} (chance 0.083)")
    info = {"scenes": args.scenes, "views": args.views, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "held_out": scores}
    print(f"saved to {save_classifier(model.cpu(), args.out, info)}")


if __name__ == "__main__":
    main()
