"""Cluster sizing: what a tour costs in FLOPs, time and S3, and what 1 M tours a day takes (cluster/README.md).

Measured here: the FLOPs of a tour (torch's FlopCounterMode over the real pipeline: the bundled model, and a UNet of
Stable Diffusion 2.1-base's shape built on the meta device, for the paper's scale), this CPU's FLOP rate on the bundled
model, and the objects and bytes a bulk job writes per tour (from a finished output folder).
Estimated: GPU tours/s = FLOPs per tour / (peak FLOP/s x utilisation), with the utilisation an assumption (printed).
Run: python bench/cluster_sizing.py [--tours outputs/tours] [--views 8] [--steps 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import format_table, write_json
from diffusers import UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from diffpano.geometry.trajectories import named_trajectory
from diffpano.io import storage
from diffpano.io.manifest import read_manifest
from diffpano.ops.op import BACKEND_ENV
from diffpano.pipelines.loading import resolve_model

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100 SXM (NVIDIA's datasheet)
UTILISATION = (0.15, 0.40)  # assumed share of peak a UNet sampler reaches (batch 1 low, batched views high)
LAUNCH_S = 15e-6  # assumed eager PyTorch cost per op on a GPU: small models are bound by it, not by FLOPs
SD21_BASE = dict(  # the UNet shape of stable-diffusion-2-1-base (its published config.json)
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    use_linear_projection=True, layers_per_block=2, sample_size=64, in_channels=4, out_channels=4)
DAY = 86400


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a call dispatches (each one a kernel launch or more on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> tuple[float, int]:
    """FLOPs and aten ops of one call."""
    with FlopCounterMode(display=False) as flops, OpCounter() as ops:
        fn()
    return float(flops.get_total_flops()), ops.ops


def gpu_seconds(flops: float, ops: int, utilisation: float) -> float:
    """Estimated H100 seconds: the FLOP time at a utilisation, or the launch time of the ops when that is longer."""
    return max(flops / (H100_BF16_PEAK * utilisation), ops * LAUNCH_S)


def bundled_tour_flops(views: int, steps: int, size: tuple[int, int]) -> dict:
    """FLOPs of one tour of the bundled model (per sampler step and fixed part), with and without the EA modules."""
    pipe = resolve_model(None, "cpu")
    poses = named_trajectory("walk", views, {"spacing": 1.0})

    def run(n: int, epipolar: bool = True):
        return lambda: pipe("a red living room", poses, height=size[0], width=size[1], num_inference_steps=n,
                            seed=0, use_epipolar=epipolar)

    # FLOPs are counted on PyTorch ops, so the EA operator runs as its chunked PyTorch form (the same arithmetic)
    chosen = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "chunked"
    try:
        (one, ops_one), (two, ops_two) = count(run(1)), count(run(2))
        per_step, ops_step = two - one, ops_two - ops_one
        no_ea = count(run(2, False))[0] - count(run(1, False))[0]
    finally:
        if chosen is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = chosen
    started = time.perf_counter()
    run(steps)()
    seconds = time.perf_counter() - started
    return {"per_step": per_step, "fixed": one - per_step, "ea_share": 1 - no_ea / per_step,
            "tour": one - per_step + steps * per_step, "ops": ops_one - ops_step + steps * ops_step,
            "cpu_seconds": seconds}


def sd21_step(size: tuple[int, int], views: int) -> tuple[float, int]:
    """FLOPs and ops of one sampler step of a tour (views batched, CFG doubling the batch) of an SD 2.1-base UNet."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE)
        latents = torch.zeros(2 * views, 4, size[0] // 8, size[1] // 8)
        text = torch.zeros(2 * views, 77, 1024)
        return count(lambda: unet(latents, torch.full((2 * views,), 10), encoder_hidden_states=text))


def s3_cost(tours_dir: str) -> dict:
    """Objects and bytes per tour written by a finished bulk job (each object is one PUT)."""
    table = read_manifest(tours_dir).to_pandas()
    fs, root = storage.resolve(tours_dir)
    files = [f for f in fs.get_file_info(__import__("pyarrow.fs", fromlist=["FileSelector"]).FileSelector(
        root, recursive=True)) if f.is_file and not f.base_name.startswith((".", "_"))]
    images = [f for f in files if f.path.endswith(".png")]
    tours = table.tour_id.nunique()
    return {"tours": tours, "views": len(table), "objects": len(files), "image_bytes": sum(f.size for f in images),
            "other_bytes": sum(f.size for f in files) - sum(f.size for f in images),
            "pixels": int((table.height * table.width).sum())}


def generation_table(bundled: dict, views: int, steps: int) -> tuple[list[list[str]], dict]:
    """Rows of the per-GPU generation estimate (bundled model and SD 2.1-base scale) and their figures."""
    cases = [("bundled 128x256", bundled["tour"], bundled["ops"])]
    for size in ((256, 512), (512, 1024)):
        flops, ops = sd21_step(size, views)
        flops *= 1 + bundled["ea_share"]  # the EA modules at the bundled model's share of a step
        cases.append((f"SD2.1-base {size[0]}x{size[1]}", flops * steps, ops * steps))
    rows, results = [], {}
    for name, flops, ops in cases:
        fast, slow = (gpu_seconds(flops, ops, u) for u in reversed(UTILISATION))
        rows.append([name, f"{flops / 1e12:.2f}", f"{ops:,}", f"{fast:.2f}-{slow:.2f}",
                     f"{3600 / slow:.0f}-{3600 / fast:.0f}", f"{1e6 * fast / DAY:.1f}-{1e6 * slow / DAY:.1f}"])
        results[name] = {"tflops_per_tour": flops / 1e12, "ops_per_tour": ops, "h100_seconds": [fast, slow]}
    return rows, results


def training_hours(config: Path, ea_share: float, gpus: int = 8) -> dict[str, list[float]]:
    """Estimated hours per stage of a training config on `gpus` H100s (a step = 3 forward passes of its images)."""
    from trainer.config import load_config

    cfg = load_config(config, ["model.base=s3://BUCKET/base"])  # the base model is only named, not read
    hours = {}
    for stage, stage_cfg, images in ((1, cfg.stage1, cfg.stage1.batch_size),
                                     (2, cfg.stage2, cfg.stage2.batch_size * cfg.stage2.views)):
        size = cfg.size(stage)
        forward = sd21_step(size, 1)[0] / 2 * (1 + ea_share * (stage == 2))  # one image, no CFG
        flops = 3 * forward * images * gpus * stage_cfg.steps
        hours[f"stage{stage}"] = [flops / (gpus * H100_BF16_PEAK * u) / 3600 for u in reversed(UTILISATION)]
    return hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tours", default="outputs/tours", help="a finished bulk output (make run writes one)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-config", type=Path, default=Path("trainer/configs/sd21-base-8gpu.yaml"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundled = bundled_tour_flops(args.views, args.steps, (128, 256))
    rows, results = generation_table(bundled, args.views, args.steps)
    results.update(bundled=bundled, cpu_flops_per_s=bundled["tour"] / bundled["cpu_seconds"])
    print(f"{args.views}-view tours, {args.steps} steps, CFG on; H100 bf16 peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s "
          f"at an assumed {UTILISATION[0]:.0%}-{UTILISATION[1]:.0%} of it, or {LAUNCH_S * 1e6:.0f} us per op "
          "when that is longer")
    print(format_table(["model", "TFLOP/tour", "ops/tour", "H100 s/tour", "tours/h/GPU", "H100s for 1M tours/day"],
                       rows))
    print(f"bundled model on this CPU: {bundled['cpu_seconds']:.1f} s/tour measured, "
          f"{results['cpu_flops_per_s'] / 1e9:.1f} GFLOP/s; EA modules {bundled['ea_share']:.1%} of a step's FLOPs")
    results["training_hours"] = training_hours(args.train_config, bundled["ea_share"])
    for stage, (fast, slow) in results["training_hours"].items():
        print(f"{args.train_config.name} {stage} on 8 H100s: {fast:.1f}-{slow:.1f} h")
    if storage.exists(storage.join(args.tours, "manifest")):
        results["s3"] = s3_cost(args.tours)
        print_s3(results["s3"], args.tours, args.views)
    write_json(args.json, results)


def print_s3(s3: dict, tours: str, views: int) -> None:
    """PUTs and bytes per tour measured on a bulk output, and per 1,000 tours at the usual sizes."""
    bytes_per_pixel = s3["image_bytes"] / s3["pixels"]
    print(f"S3 from {tours}: {s3['tours']} tours, {s3['views']} views -> {s3['objects']} objects "
          f"({s3['objects'] / s3['tours']:.2f} PUTs per tour), PNG {bytes_per_pixel:.2f} bytes/pixel, manifest parts "
          f"{s3['other_bytes'] / s3['tours'] / 1e3:.1f} kB per tour")
    for h in (128, 256, 512):
        gb = 1000 * views * (h * 2 * h * bytes_per_pixel) / 1e9
        print(f"  per 1,000 {views}-view tours at {h}x{2 * h}: {1000 * views:,} image PUTs, {gb:.2f} GB")


if __name__ == "__main__":
    main()
