"""The EA operator's fused CPU kernel (cpu_kernel.c): compiled with the system C compiler on first use, called by ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from diffpano.epipolar_ops.layout import SampleTable

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
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


def build() -> Path:
    """Compile the kernel unless a build of this source with these flags exists; return the library's path."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc) for the EA CPU kernel")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
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
    pointers = [ctypes.c_void_p] * 7
    lib.ea_forward.argtypes = pointers + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 8
    lib.ea_backward.argtypes = pointers + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 8
    lib.ea_threads.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel can be built and loaded here."""
    try:
        library()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        log.warning("EA CPU kernel unavailable, using the chunked PyTorch operator: %s", err)
        return False
    return True


def _sizes(q: torch.Tensor, code: torch.Tensor, table: SampleTable) -> list[int]:
    """The kernel's size arguments."""
    copies, rows, heads, dim = q.shape
    return [copies, rows, heads, dim, code.shape[-1], code.shape[1], table.height, table.width]


def _ptr(t: torch.Tensor) -> int:
    """Address of a contiguous CPU tensor's data."""
    return t.data_ptr()


def forward(q, kv, qg, nl, code, table: SampleTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (copies, rows, heads, dim + rank) and log-sum-exp (copies, rows, heads); fp32 contiguous inputs."""
    copies, rows, heads, dim = q.shape
    out = q.new_empty(copies, rows, heads, dim + code.shape[-1])
    lse = q.new_empty(copies, rows, heads)
    args = [q, kv, qg, nl, code, table.base, table.frac, out, lse]
    library().ea_forward(*map(_ptr, args), *_sizes(q, code, table))
    return out, lse


def backward(q, kv, qg, nl, code, table: SampleTable, lse: torch.Tensor, dout: torch.Tensor) -> tuple:
    """Gradients of (q, kv, qg, nl, code)."""
    lib = library()
    dq, dqg, dnl, dcode = (torch.empty_like(t) for t in (q, qg, nl, code))
    dkv = kv.new_zeros(lib.ea_threads(), *kv.shape)  # one buffer per thread: the scatter needs no atomics
    args = [q, kv, qg, nl, code, table.base, table.frac, lse, dout.contiguous(), dq, dkv, dqg, dnl, dcode]
    lib.ea_backward(*map(_ptr, args), *_sizes(q, code, table))
    return dq, dkv.sum(0), dqg, dnl, dcode
