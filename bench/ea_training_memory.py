"""Stage-2 activation memory of the EA modules of an SD-shaped UNet, 8-view clips: the fused operator vs the oracle.

The EA modules of Stable Diffusion 1.5's UNet (after the transformers of its last two up blocks: 3 at C=640, 1/16 of
the image, and 3 at C=320, 1/8) run forward with gradients on 8-view clips (one copy, as in training); one module of
each shape is measured (the three of a level are alike). Reported per size, summed over the modules: tensors saved for
the backward pass (unique storages: the activation memory training holds until backward) and the forwards' peak
allocations; and the same for the oracle, which keeps every sampled key, value and geometry offset (the operator before
issue 18). The rest of the UNet is unchanged by the operator.
Run: python bench/ea_training_memory.py [--sizes 256x512 512x1024] [--views 8] [--json P]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
from collections import Counter
from pathlib import Path

import torch
from common import format_table, write_json
from diffusers import UNet2DConditionModel

from diffpano.geometry.trajectories import walk
from diffpano.models.epipolar import EpipolarAdapter
from diffpano.ops.memory import cpu_peak_profiler
from diffpano.ops.reference import reference_forward
from diffpano.pipelines.factory import sd_unet_config

MB = 2**20
VAE_FACTOR = 8


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward during fn()."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def modules(adapter: EpipolarAdapter, config: dict, height: int) -> list[tuple[str, torch.nn.Module, int]]:
    """(target, module, feature height) of every EA module for images `height` pixels high."""
    levels = len(config["block_out_channels"])
    out = []
    for target in adapter.config.targets:
        block = int(target.split(".")[1])
        size = height // VAE_FACTOR // 2 ** (levels - 1 - block)
        out.append((target, adapter.blocks[target.replace(".", "_")], size))
    return out


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc), so that large cases do not pile up."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(block, ctx, x: torch.Tensor, oracle: bool) -> tuple[int, int]:
    """(saved bytes, peak forward allocation) of one module's forward with gradients."""
    fn = (lambda: reference_forward(block, x, ctx)) if oracle else (lambda: block(x, ctx))
    saved = saved_bytes(fn)
    peak, _ = cpu_peak_profiler(fn)
    return saved, peak


def main() -> None:
    """Measure every size, print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["256x512", "512x1024"], help="image sizes HxW")
    p.add_argument("--views", type=int, default=8, help="views per clip (default 8)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    start = time.perf_counter()
    config = sd_unet_config("1.5")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    adapter = EpipolarAdapter.for_unet(unet)
    for blk in adapter.blocks.values():
        torch.nn.init.normal_(blk.to_out.weight, std=0.02)
    rows, records = [], []
    for size in args.sizes:
        height = int(size.split("x")[0])
        totals = {"fused_saved": 0, "fused_peak": 0, "oracle_saved": 0, "oracle_peak": 0}
        layout = {(b.norm.num_channels, h): b for _, b, h in modules(adapter, config, height)}
        shapes = Counter((b.norm.num_channels, h) for _, b, h in modules(adapter, config, height))
        for (channels, h), count in shapes.items():  # modules of one shape cost the same: measure one
            block = layout[channels, h]
            ctx = adapter.context(walk(args.views, spacing=1.0).unsqueeze(0))
            x = torch.randn(args.views, channels, h, 2 * h, requires_grad=True)
            for oracle in (False, True):
                saved, peak = measure(block, ctx, x, oracle)
                name = "oracle" if oracle else "fused"
                totals[f"{name}_saved"] += count * saved
                totals[f"{name}_peak"] += count * peak
                print(f"  {size}: {count} modules at {h}x{2 * h}, C={channels}, {name}: saved {saved / MB:.0f} MB, "
                      f"peak {peak / MB:.0f} MB each", flush=True)
                release_memory()
        rec = {"size": size, **{k: v / MB for k, v in totals.items()}}
        rec["saved_ratio"] = totals["oracle_saved"] / totals["fused_saved"]
        records.append(rec)
        rows.append([size, rec["oracle_saved"], rec["fused_saved"], rec["saved_ratio"], rec["oracle_peak"],
                     rec["fused_peak"]])
    print(format_table(["size", "oracle saved MB", "fused saved MB", "oracle/fused", "oracle peak MB",
                        "fused peak MB"], rows))
    print("saved: activation memory held for backward by all EA modules of one 8-view clip; peak: the forwards' peak "
          "allocations, summed over modules")
    print(f"total time {time.perf_counter() - start:.0f} s")
    write_json(args.json, {"benchmark": "ea_training_memory", "views": args.views, "results": records})


if __name__ == "__main__":
    main()
