"""Shared helpers of the benchmark scripts: device and dtype choice, timing, peak memory, tables and JSON output."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from diffpano.ops.memory import cpu_peak_profiler
from diffpano.pipelines.loading import default_dtype, pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MB = 2**20


def add_common_args(parser: argparse.ArgumentParser, warmup: int = 1, repeats: int = 3) -> None:
    """Options shared by the benchmarks: device, dtype, threads, warm-up/repeat counts, seed and --json."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on cpu (default 2)")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up calls per case ({warmup})")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed calls per case, median taken ({repeats})")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for weights and inputs")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON here")


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Resolve device and dtype from the options, fix the CPU thread count and seed torch."""
    diffusers_logging.set_verbosity_error()  # ModelMixin.to(dtype) warns about (no) modules kept in fp32 otherwise
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return device, dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Short name (fp32, bf16, fp16) of a dtype."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def sync(device: torch.device) -> None:
    """Wait for queued kernels on CUDA so that host timers and memory counters are exact."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock milliseconds of one call of fn, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def round_robin(
    cases: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Times (ms) of every case, taken in interleaved rounds so that background load affects all cases alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(time_ms(fn, device))
    return times


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def _proc_status_kb(field: str) -> int:
    """A kB field (VmRSS, VmHWM) of /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_rss(fn: Callable[[], object]) -> int:
    """Growth of the resident set's high-water mark during one call (a lower bound: freed memory gets reused)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _proc_status_kb("VmRSS")
    fn()
    return max(0, _proc_status_kb("VmHWM") - base) * 1024


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory that one call of fn adds on top of what was allocated before it, with the method used."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": (peak - base) / MB, "max_memory_allocated_mb": peak / MB,
                "method": "torch.cuda.max_memory_allocated - memory_allocated before the call"}
    try:
        peak, total = cpu_peak_profiler(fn)
        return {"peak_mb": peak / MB, "total_allocated_mb": total / MB,
                "method": "torch.profiler(profile_memory=True): max running sum of allocation events"}
    except (AttributeError, RuntimeError) as err:
        return {"peak_mb": cpu_peak_rss(fn) / MB,
                "method": f"VmHWM-VmRSS delta via /proc/self/clear_refs (profiler unusable: {err})"}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Machine, library and load information stored with the results."""
    info = {
        "torch": torch.__version__, "device": str(device), "dtype": dtype_name(dtype),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def print_environment(info: dict) -> None:
    """One line describing the machine, and a warning when other processes load the CPU."""
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_capability']}), {info['threads']} threads"
    load = info["loadavg_start"][0]
    print(f"torch {info['torch']} | {info['device']} {info['dtype']} | {where} | load average {load:.2f}")
    if info["device"] == "cpu" and load > 0.5 * (info["cpu_count"] or 1):
        print("WARNING: the CPU is busy with other processes; timings are noisy (cases are interleaved and medians "
              "taken, so the ratios suffer less than the absolute times).")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A right-aligned plain-text table; floats get 2 decimals (3 below 10), None prints as '-'."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if not math.isfinite(value):
                return str(value)
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def goal_line(description: str, met: bool | None) -> str:
    """'GOAL ... : met / NOT met / not measured'."""
    verdict = "not measured" if met is None else ("met" if met else "NOT met")
    return f"GOAL {description}: {verdict}"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: Path | None, payload: dict) -> None:
    """Write the results as indented JSON when a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results written to {path}")
