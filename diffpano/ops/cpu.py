"""The EA operator's fused CPU kernel (cpu_kernel.c): built with the system C compiler on first use, run by ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from diffpano.ops.layout import SampleTable

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c11"]
CACHE_ENV = "DIFFPANO_KERNEL_CACHE"  # where compiled kernels are kept (default ~/.cache/diffpano/kernels)


def cache_dir() -> Path:
    """Directory of compiled kernels."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffpano" / "kernels")


def compiler() -> str | None:
    """The C compiler to build with ($CC, cc or gcc), or None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def cpu_features() -> str:
    """This CPU's instruction-set flags: builds use -march=native, so a cache shared by other CPUs keeps them apart."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine() + platform.processor()


def build() -> Path:
    """Compile the kernel unless a build of this source with these flags exists; return the library's path."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc) for the EA CPU kernel")
    key = " ".join([cc, *FLAGS, cpu_features()])
    digest = hashlib.sha256(SOURCE.read_bytes() + key.encode()).hexdigest()[:16]
    lib = cache_dir() / f"ea_cpu_{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build aside, then rename: no half-written library
            out = Path(tmp) / lib.name
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True)
            out.replace(lib)
        log.info("EA CPU kernel compiled: %s", lib)
    return lib


@cache
def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first use)."""
    lib = ctypes.CDLL(str(build()))
    sizes = [ctypes.c_int64] * 9  # 7 sizes and the row range
    lib.ea_forward.argtypes = [ctypes.c_void_p] * 10 + sizes
    lib.ea_backward.argtypes = [ctypes.c_void_p] * 13 + sizes
    return lib


@cache
def _pool() -> ThreadPoolExecutor:
    """Threads that run row ranges concurrently (the kernel holds no GIL; torch's thread count sets their number)."""
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="ea-cpu")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of its parent's threads


def _ranges(rows: int) -> list[tuple[int, int]]:
    """One contiguous range of rows per thread."""
    parts = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _run(fn, args: list, sizes: list[int], ranges: list[tuple[int, int]], per_range=None) -> None:
    """Call fn over every range on the pool; per_range(i) gives range i's own trailing pointer arguments."""
    pointers = [t.data_ptr() for t in args]
    jobs = [
        _pool().submit(fn, *pointers, *(per_range(i) if per_range else []), *sizes, a, b)
        for i, (a, b) in enumerate(ranges)
    ]
    for job in jobs:
        job.result()


@cache
def available() -> bool:
    """Whether the kernel can be built and loaded here (decided once per process: a failed build is not retried)."""
    try:
        library()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        log.warning("EA CPU kernel unavailable, using the chunked PyTorch operator: %s", err)
        return False
    return True


def _sizes(q: torch.Tensor, code: torch.Tensor, table: SampleTable) -> list[int]:
    """The kernel's size arguments."""
    copies, rows, heads, dim = q.shape
    return [copies, rows, heads, dim, code.shape[-1], code.shape[1], table.width]


def forward(q, kv, code, geo_k, geo_v, null_key, table: SampleTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (copies, rows, heads, dim) and log-sum-exp (copies, rows, heads); fp32 contiguous inputs."""
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1])
    args = [q, kv, code, geo_k, geo_v, null_key, table.base, table.frac, out, lse]
    _run(library().ea_forward, args, _sizes(q, code, table), _ranges(q.shape[1]))
    return out, lse


def backward(q, kv, code, geo_k, geo_v, null_key, table: SampleTable, lse: torch.Tensor, dout: torch.Tensor) -> tuple:
    """Gradients of (q, kv, code, geo_k, geo_v, null_key)."""
    ranges = _ranges(q.shape[1])
    dq, dcode = torch.empty_like(q), torch.empty_like(code)
    dkv = kv.new_zeros(len(ranges), *kv.shape)  # one buffer per range: the scatter needs no atomics
    dweights = q.new_zeros(len(ranges), 2 * geo_k.numel() + null_key.numel())
    args = [q, kv, code, geo_k, geo_v, null_key, table.base, table.frac, dout, dq]
    trailing = lambda i: [dkv[i].data_ptr(), dcode.data_ptr(), dweights[i].data_ptr()]  # noqa: E731
    _run(library().ea_backward, args, _sizes(q, code, table), ranges, trailing)
    dgeo_k, dgeo_v, dnull = dweights.sum(0).split([geo_k.numel(), geo_v.numel(), null_key.numel()])
    small = (g.view_as(w).clone() for g, w in ((dgeo_k, geo_k), (dgeo_v, geo_v), (dnull, null_key)))  # unaliased
    return dq, dkv.sum(0), dcode, *small
