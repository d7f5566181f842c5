"""Train the FAED panorama autoencoder on procedural panoramas (or a dataset) and save it.

Run: python scripts/train_faed.py [--dataset URI] [--scenes 300] [--steps 2000] [--out diffpano/assets/metrics/faed]
Without --dataset it renders its own panoramas (random rooms, eye height, random yaw) at 64x128.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from diffpano.data.loaders import PanoramaDataset
from diffpano.metrics.adherence import make_training_set
from diffpano.metrics.faed import reconstruction_error, save_autoencoder, train_autoencoder
from diffpano.metrics.images import channels_first

SIZE = (64, 128)


def main() -> None:
    """Build the training and held-out sets, train, report reconstruction errors, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None, help="train on this dataset (docs/datasets.md), not fresh renders")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="diffpano/assets/metrics/faed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    held_out, _, _ = make_training_set(60, 2, SIZE, seed=args.seed + 10_000)
    held = channels_first(held_out)
    if args.dataset:
        source = PanoramaDataset(args.dataset, size=SIZE, seed=args.seed)
    else:
        images, _, _ = make_training_set(args.scenes, args.views, SIZE, seed=args.seed)
        source = channels_first(images)
    print(f"training data ready in {time.perf_counter() - started:.0f}s")
    bar = tqdm(total=args.steps, desc="faed autoencoder")

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(l1=f"{loss:.4f}")

    model = train_autoencoder(source, args.steps, args.batch_size, args.lr, args.seed, progress)
    bar.close()
    error = reconstruction_error(model, held)
    save_autoencoder(model, args.out)
    print(f"held-out L1 reconstruction error {error:.4f} (in [-1, 1] units); {time.perf_counter() - started:.0f}s; "
          f"saved to {args.out}")


if __name__ == "__main__":
    main()
