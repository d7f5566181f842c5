"""One EA module versus dense cross-view attention (MVDream style) over all N*h*w tokens: time and peak memory.

Goals (issue 18): at N = 8, EA at least 20x faster than dense, its peak memory no more than dense's, at most 32 MB
held between steps; the EA cost per view flat in N.
Run: python bench/ea_vs_dense.py [--channels 128] [--height 32] [--views 2 4 8 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from common import (
    MB,
    add_common_args,
    environment,
    format_table,
    goal_line,
    median,
    peak_memory,
    print_environment,
    setup,
    time_ms,
    write_json,
)
from torch import nn

from diffpano.geometry.trajectories import walk
from diffpano.models.epipolar import EpipolarAdapter, EpipolarAttention

GOAL_SPEEDUP = 20.0
GOAL_AT_N = 8
GOAL_HELD_MB = 32.0


class DenseCrossViewAttention(nn.Module):
    """MVDream-style baseline: multi-head self-attention over the concatenated tokens of all N views of a group."""

    def __init__(self, channels: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.Linear(inner, channels)

    def qkv(self, x: torch.Tensor, num_views: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (G, heads, N*h*w, head_dim) of x (G*N, C, h, w)."""
        b, c, h, w = x.shape
        tokens = self.norm(x).view(b // num_views, num_views, c, h * w).transpose(2, 3).reshape(b // num_views, -1, c)
        split = (tokens.shape[0], tokens.shape[1], self.num_heads, self.head_dim)
        return tuple(proj(tokens).view(split).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))

    def forward(self, x: torch.Tensor, num_views: int) -> torch.Tensor:
        """x (G*N, C, h, w) plus attention over every token of every view of its group."""
        b, c, h, w = x.shape
        out = F.scaled_dot_product_attention(*self.qkv(x, num_views))  # (G, heads, L, head_dim)
        out = self.to_out(out.transpose(1, 2).flatten(2))  # (G, L, C)
        return x + out.view(b // num_views, num_views, h * w, c).transpose(2, 3).reshape(b, c, h, w)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=128, help="feature channels C of the layer (default 128)")
    p.add_argument("--height", type=int, default=32, help="feature-map height h; width = 2h (default 32)")
    p.add_argument("--views", type=int, nargs="+", default=[2, 4, 8, 16], help="numbers of views N (2 4 8 16)")
    p.add_argument("--num-ref-views", type=int, default=None, help="EA reference views K (default: the adapter's)")
    p.add_argument("--num-samples", type=int, default=None, help="EA samples per arc S (default: the adapter's)")
    p.add_argument("--spacing", type=float, default=1.0, help="metres between the views of the walk (default 1)")
    p.add_argument("--mem-limit-gb", type=float, default=8.0, help="skip dense cases predicted to need more (8)")
    p.add_argument("--dense-time-budget", type=float, default=150.0,
                   help="skip a dense case predicted to take longer than this many seconds in all (150)")
    p.add_argument("--force-dense", action="store_true", help="run every dense case whatever the predictions")
    p.add_argument("--flat-tol", type=float, default=1.5, help="'flat': max/min EA ms per view over N (1.5)")
    add_common_args(p, warmup=1, repeats=5)
    return p.parse_args()


def build_modules(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[EpipolarAdapter, EpipolarAttention, DenseCrossViewAttention]:
    """The EA adapter with one module 'x' (random non-zero output projection) and a dense layer of equal width."""
    given = {"num_ref_views": args.num_ref_views, "num_samples": args.num_samples}
    kwargs = {k: v for k, v in given.items() if v is not None}
    adapter = EpipolarAdapter(targets=["x"], channels=[args.channels], **kwargs)
    block: EpipolarAttention = adapter.blocks["x"]
    nn.init.normal_(block.to_out.weight, std=0.02)
    dense = DenseCrossViewAttention(args.channels, block.num_heads, block.head_dim)
    nn.init.normal_(dense.to_out.weight, std=0.02)
    return adapter.to(device, dtype).eval(), block, dense.to(device, dtype).eval()


def sdp_backend(dense: DenseCrossViewAttention, x: torch.Tensor, num_views: int) -> str:
    """Name of the scaled_dot_product_attention kernel PyTorch picks for these inputs (FLASH_ATTENTION, MATH, ...)."""
    try:
        from torch.nn.attention import SDPBackend

        with torch.no_grad():
            q, k, v = dense.qkv(x[:num_views], num_views)
        return SDPBackend(torch._fused_sdp_choice(q, k, v)).name
    except (AttributeError, ImportError, RuntimeError, ValueError) as err:
        return f"unknown ({type(err).__name__})"


def matrix_bytes(n: int, h: int, w: int, heads: int, dtype: torch.dtype) -> int:
    """Bytes of the (heads, N*h*w, N*h*w) attention matrix of one group if it were materialised."""
    return heads * (n * h * w) ** 2 * torch.finfo(dtype).bits // 8


def ea_case(adapter: EpipolarAdapter, block: EpipolarAttention, x: torch.Tensor, poses: torch.Tensor,
            args: argparse.Namespace, device: torch.device) -> dict:
    """EA times with a warm context and for the first (cache-building) call, peak memory and cache size."""
    ctx = adapter.context(poses)

    def warm() -> torch.Tensor:
        with torch.no_grad():
            return block(x, ctx)

    def first() -> torch.Tensor:
        with torch.no_grad():
            return block(x, adapter.context(poses))

    for _ in range(max(1, args.warmup)):
        warm()
    first_ms = [time_ms(first, device) for _ in range(args.repeats)]
    warm_ms = [time_ms(warm, device) for _ in range(args.repeats)]
    mem = peak_memory(warm, device)
    mem_first = peak_memory(first, device)
    return {"ms": median(warm_ms), "first_ms": median(first_ms), "all_ms": warm_ms, "all_first_ms": first_ms,
            "peak_mb": mem["peak_mb"], "first_peak_mb": mem_first["peak_mb"], "cache_mb": ctx.held_bytes() / MB,
            "memory": mem}


def dense_prediction(n: int, done: list[dict], backend: str, est: int, tokens_bytes: int) -> tuple[float, float | None]:
    """Predicted (peak bytes, seconds per call) of the dense case at N from the cases measured at smaller N."""
    materialises = backend == "MATH" or backend.startswith("unknown")
    prev = done[-1] if done else None
    if prev is None:
        return (2 * est if materialises else 8 * tokens_bytes), None
    scale = n / prev["N"]
    peak = prev["dense_peak_mb"] * MB * (scale**2 if materialises else scale)
    return max(peak, 2 * est if materialises else 0), prev["dense_ms"] / 1e3 * scale**2


def dense_case(dense: DenseCrossViewAttention, x: torch.Tensor, n: int, args: argparse.Namespace,
               device: torch.device, skip: str | None) -> dict:
    """Dense times and peak memory at N, or the reason it was skipped."""
    if skip:
        return {"skipped": skip}

    def run() -> torch.Tensor:
        with torch.no_grad():
            return dense(x, n)

    for _ in range(max(1, args.warmup)):
        run()
    times = [time_ms(run, device) for _ in range(args.repeats)]
    mem = peak_memory(run, device)
    return {"ms": median(times), "all_ms": times, "peak_mb": mem["peak_mb"], "memory": mem}


def skip_reason(pred_bytes: float, pred_s: float | None, args: argparse.Namespace) -> str | None:
    """Why a dense case is skipped (over the memory limit or time budget), or None to run it."""
    if args.force_dense:
        return None
    if pred_bytes > args.mem_limit_gb * 2**30:
        return f"predicted peak {pred_bytes / 2**30:.2f} GB > --mem-limit-gb {args.mem_limit_gb}"
    calls = max(1, args.warmup) + args.repeats + 1
    if pred_s is not None and pred_s * calls > args.dense_time_budget:
        return f"predicted {pred_s:.1f} s/call x {calls} calls > --dense-time-budget {args.dense_time_budget:.0f} s"
    return None


def run_all(args: argparse.Namespace, adapter: EpipolarAdapter, block: EpipolarAttention,
            dense: DenseCrossViewAttention, backend: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Measure EA and dense at every N (ascending, so each dense prediction uses the last measured case)."""
    h, w, records, done = args.height, 2 * args.height, [], []
    for n in sorted(args.views):
        x = torch.randn(n, args.channels, h, w, device=device, dtype=dtype)
        poses = walk(n, spacing=args.spacing).unsqueeze(0)
        est = matrix_bytes(n, h, w, block.num_heads, dtype)
        tokens = n * h * w * block.num_heads * block.head_dim * torch.finfo(dtype).bits // 8
        pred_bytes, pred_s = dense_prediction(n, done, backend, est, tokens)
        ea = ea_case(adapter, block, x, poses, args, device)
        dn = dense_case(dense, x, n, args, device, skip_reason(pred_bytes, pred_s, args))
        rec = {"N": n, "ea_ms": ea["ms"], "ea_first_ms": ea["first_ms"], "ea_peak_mb": ea["peak_mb"],
               "ea_first_peak_mb": ea["first_peak_mb"], "ea_cache_mb": ea["cache_mb"], "ea_ms_per_view": ea["ms"] / n,
               "ea_first_ms_per_view": ea["first_ms"] / n, "attn_matrix_mb_if_materialised": est / MB,
               "dense_predicted_peak_mb": pred_bytes / MB, "ea_raw": ea, "dense_raw": dn}
        if "skipped" in dn:
            rec["dense_skipped"] = dn["skipped"]
            print(f"N={n}: dense attention SKIPPED: {dn['skipped']} (use --force-dense to run it anyway)")
        else:
            rec.update(dense_ms=dn["ms"], dense_peak_mb=dn["peak_mb"], dense_ms_per_view=dn["ms"] / n,
                       time_ratio=dn["ms"] / ea["ms"], mem_ratio=dn["peak_mb"] / max(ea["peak_mb"], 1e-9))
            done.append(rec)
        print(f"  measured N={n}: EA {ea['ms']:.1f} ms, dense "
              + (f"{rec['dense_ms']:.1f} ms" if "dense_ms" in rec else "skipped"), flush=True)
        records.append(rec)
    return records


def loglog_slope(ns: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(N): 1 = linear in N (flat per view), 2 = quadratic."""
    if len(ns) < 2:
        return None
    xs, ys = [math.log(n) for n in ns], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def report(records: list[dict], args: argparse.Namespace, memory_method: str) -> dict:
    """Print the time and memory tables and the goal verdicts; return the summary."""
    time_rows = [[r["N"], r["ea_ms"], r["ea_first_ms"], r.get("dense_ms"), r.get("time_ratio"), r["ea_ms_per_view"],
                  r["ea_first_ms_per_view"], r.get("dense_ms_per_view")] for r in records]
    print(format_table(["N", "EA ms", "EA 1st-call ms", "dense ms", "dense/EA time", "EA ms/view",
                        "EA 1st ms/view", "dense ms/view"], time_rows))
    print()
    mem_rows = [[r["N"], r["ea_peak_mb"], r["ea_first_peak_mb"], r["ea_cache_mb"], r.get("dense_peak_mb"),
                 r.get("mem_ratio"), r["attn_matrix_mb_if_materialised"]] for r in records]
    print(format_table(["N", "EA MB", "EA 1st-call MB", "EA cache MB (held)", "dense MB", "dense/EA memory",
                        "attn matrix MB if materialised"], mem_rows))
    print(f"memory: peak added by one forward (EA cache: held by the context between steps, not in 'EA MB'); "
          f"method: {memory_method}")
    if any(r.get("mem_ratio", 1.0) < 1.0 for r in records):
        print("note: dense/EA memory < 1 means the EA module needs MORE memory than dense attention, whose kernel "
              "never materialises the attention matrix.")
    ns = [r["N"] for r in records]
    per_view = [r["ea_ms_per_view"] for r in records]
    flat = max(per_view) / min(per_view)
    dense_recs = [r for r in records if "dense_ms" in r]
    summary = {
        "ea_time_slope": loglog_slope(ns, [r["ea_ms"] for r in records]),
        "dense_time_slope": loglog_slope([r["N"] for r in dense_recs], [r["dense_ms"] for r in dense_recs]),
        "ea_per_view_max_over_min": flat, "flat_tol": args.flat_tol,
    }
    at = next((r for r in records if r["N"] == GOAL_AT_N), None)
    summary["goal_speedup_met"] = None if at is None or "time_ratio" not in at else at["time_ratio"] >= GOAL_SPEEDUP
    summary["goal_flat_met"] = flat <= args.flat_tol if len(ns) > 1 else None
    summary["goal_memory_met"] = None if at is None or "mem_ratio" not in at else at["mem_ratio"] >= 1.0
    summary["goal_held_met"] = None if at is None else at["ea_cache_mb"] <= GOAL_HELD_MB
    slope = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"log-log slope of time vs N (1 = flat per view, 2 = quadratic): EA {slope(summary['ea_time_slope'])}, "
          f"dense {slope(summary['dense_time_slope'])}")
    speed = "-" if at is None or "time_ratio" not in at else f"{at['time_ratio']:.2f}x"
    mem = "-" if at is None or "mem_ratio" not in at else f"{at['mem_ratio']:.2f}x"
    print(goal_line(f"EA >= {GOAL_SPEEDUP:.0f}x faster than dense at N={GOAL_AT_N} (time; measured {speed}, "
                    f"memory ratio {mem})", summary["goal_speedup_met"]))
    print(goal_line(f"EA peak memory <= dense at N={GOAL_AT_N} (dense/EA memory {mem})", summary["goal_memory_met"]))
    held = "-" if at is None else f"{at['ea_cache_mb']:.1f} MB"
    print(goal_line(f"EA memory held between steps <= {GOAL_HELD_MB:.0f} MB at N={GOAL_AT_N} ({held})",
                    summary["goal_held_met"]))
    print(goal_line(f"EA cost per view flat in N (max/min ms per view {flat:.2f} <= {args.flat_tol})",
                    summary["goal_flat_met"]))
    return summary


def main() -> None:
    """Build both layers, measure every N, print the tables and goal verdicts, write JSON."""
    start = time.perf_counter()
    args = parse_args()
    device, dtype = setup(args)
    info = environment(device, dtype)
    print_environment(info)
    adapter, block, dense = build_modules(args, device, dtype)
    cfg = adapter.config
    h, w = args.height, 2 * args.height
    backend = sdp_backend(dense, torch.zeros(2, args.channels, h, w, device=device, dtype=dtype), 2)
    print(f"layer: C={args.channels} at {h}x{w}, {block.num_heads} heads x {block.head_dim} dims; EA K="
          f"{cfg.num_ref_views}, S={cfg.num_samples}; dense over N*{h * w} tokens with "
          f"scaled_dot_product_attention (kernel: {backend})")
    print(f"timing: {max(1, args.warmup)} warm-up + {args.repeats} timed calls per case, median; EA 'warm' reuses a "
          "context whose sampling caches are built (as across denoising steps), EA '1st call' builds them")
    records = run_all(args, adapter, block, dense, backend, device, dtype)
    print()
    method = records[0]["ea_raw"]["memory"]["method"] if records else "-"
    summary = report(records, args, method)
    elapsed = time.perf_counter() - start
    print(f"total time {elapsed:.1f} s")
    info["loadavg_end"] = list(os.getloadavg())
    public = {k: v for k, v in cfg.items() if not k.startswith("_")}
    write_json(args.json, {
        "benchmark": "ea_vs_dense", "channels": args.channels, "height": args.height, "width": 2 * args.height,
        "heads": block.num_heads, "head_dim": block.head_dim, "adapter_config": public, "sdp_kernel": backend,
        "memory_method": method, "warmup": args.warmup, "repeats": args.repeats, "environment": info,
        "results": records, "summary": summary, "elapsed_s": elapsed,
    })


if __name__ == "__main__":
    main()
