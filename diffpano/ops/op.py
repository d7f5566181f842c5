"""The fused EA operator: one call, the backend chosen for the device, gradients by the same backend."""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from diffpano.ops import chunked, cpu, triton_kernel
from diffpano.ops.layout import SampleTable

BACKEND_ENV = "DIFFPANO_EA_BACKEND"  # force one backend: cpu, triton or chunked
BACKENDS: dict[str, ModuleType] = {"cpu": cpu, "triton": triton_kernel, "chunked": chunked}
NATIVE_DTYPES = {"cpu": (torch.float32,), "triton": (torch.float32, torch.bfloat16, torch.float16)}


@torch.compiler.assume_constant_result  # torch.compile takes the choice as made, without tracing kernel builds
def default_backend(device: torch.device, head_dim: int | None = None) -> str:
    """The fastest backend that works on device for heads of head_dim ($DIFFPANO_EA_BACKEND overrides the choice)."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}: unknown EA backend {forced!r}; choose from {sorted(BACKENDS)}")
        return forced
    if device.type == "cpu" and cpu.available():
        return "cpu"
    if device.type == "cuda" and triton_kernel.available() and (head_dim is None or triton_kernel.supports(head_dim)):
        return "triton"
    return "chunked"


@torch.library.custom_op("diffpano::ea_forward", mutates_args=())
def _native_forward(
    q: Tensor, kv: Tensor, code: Tensor, geo_k: Tensor, geo_v: Tensor, null_key: Tensor, base: Tensor, frac: Tensor,
    width: int, backend: str,
) -> tuple[Tensor, Tensor]:
    """A native backend's forward as one opaque op: torch.compile keeps it in its graph instead of breaking there."""
    return BACKENDS[backend].forward(q, kv, code, geo_k, geo_v, null_key, SampleTable(base, frac, width))


@_native_forward.register_fake
def _(q: Tensor, kv, code, geo_k, geo_v, null_key, base, frac, width, backend) -> tuple[Tensor, Tensor]:
    """Output and log-sum-exp shapes for tracing."""
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("diffpano::ea_backward", mutates_args=())
def _native_backward(
    q: Tensor, kv: Tensor, code: Tensor, geo_k: Tensor, geo_v: Tensor, null_key: Tensor, base: Tensor, frac: Tensor,
    width: int, backend: str, lse: Tensor, dout: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A native backend's gradients of (q, kv, code, geo_k, geo_v, null_key), each in its input's dtype."""
    inputs = (q, kv, code, geo_k, geo_v, null_key)
    grads = BACKENDS[backend].backward(*inputs, SampleTable(base, frac, width), lse, dout)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))


@_native_backward.register_fake
def _(q: Tensor, kv, code, geo_k, geo_v, null_key, base, frac, width, backend, lse, dout) -> tuple:
    """Gradient shapes for tracing."""
    return tuple(torch.empty_like(t) for t in (q, kv, code, geo_k, geo_v, null_key))


def _forward(backend: str, args: list[Tensor], table: SampleTable) -> tuple[Tensor, Tensor]:
    """Output and log-sum-exp: native backends through their op, the chunked one as plain (traceable) PyTorch."""
    if backend in NATIVE_DTYPES:
        return _native_forward(*args, table.base, table.frac, table.width, backend)
    return chunked.forward(*args, table)


def _backward(backend: str, args: list[Tensor], table: SampleTable, lse: Tensor, dout: Tensor) -> tuple:
    """Gradients of the six operator inputs."""
    if backend in NATIVE_DTYPES:
        return _native_backward(*args, table.base, table.frac, table.width, backend, lse, dout)
    return chunked.backward(*args, table, lse, dout)


class _Attention(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs and the log-sum-exp, never the samples."""

    @staticmethod
    def forward(ctx, q, kv, code, geo_k, geo_v, null_key, table: SampleTable, backend: str):
        """Run the backend's forward in its native dtype."""
        inputs = (q, kv, code, geo_k, geo_v, null_key)
        native = NATIVE_DTYPES.get(backend)
        work = q.dtype if native is None or q.dtype in native else native[0]
        args = [t.to(work).contiguous() for t in inputs]
        out, lse = _forward(backend, args, table)
        ctx.save_for_backward(*args, lse)
        ctx.table, ctx.backend, ctx.dtypes = table, backend, [t.dtype for t in inputs]
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        """The backend's gradients of every input but the table and the backend name."""
        *args, lse = ctx.saved_tensors
        grads = _backward(ctx.backend, args, ctx.table, lse, dout.to(args[0].dtype).contiguous())
        return (*(g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)), None, None)


def epipolar_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    code: torch.Tensor,
    geo_k: torch.Tensor,
    geo_v: torch.Tensor,
    null_key: torch.Tensor,
    table: SampleTable,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention of each row over its K*S bilinear samples and a null token (layout.py gives the shapes)."""
    backend = backend or default_backend(q.device, q.shape[-1])
    return _Attention.apply(q, kv, code, geo_k, geo_v, null_key, table, backend)
