"""The fused EA operator: one call, the backend chosen for the device, gradients by the same backend."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from diffpano.epipolar_ops import chunked, cpu, triton_kernel
from diffpano.epipolar_ops.layout import SampleTable

BACKEND_ENV = "DIFFPANO_EA_BACKEND"  # force one backend: cpu, triton or chunked
BACKENDS: dict[str, ModuleType] = {"cpu": cpu, "triton": triton_kernel, "chunked": chunked}
NATIVE_DTYPES = {"cpu": (torch.float32,), "triton": (torch.float32, torch.bfloat16, torch.float16)}


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


class _Attention(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs and the log-sum-exp, never the samples."""

    @staticmethod
    def forward(ctx, q, kv, code, geo_k, geo_v, null_key, table: SampleTable, backend: str):
        """Run the backend's forward in its native dtype."""
        inputs = (q, kv, code, geo_k, geo_v, null_key)
        native = NATIVE_DTYPES.get(backend)
        work = q.dtype if native is None or q.dtype in native else native[0]
        args = [t.to(work).contiguous() for t in inputs]
        out, lse = BACKENDS[backend].forward(*args, table)
        ctx.save_for_backward(*args, lse)
        ctx.table, ctx.backend, ctx.dtypes = table, backend, [t.dtype for t in inputs]
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        """The backend's gradients of every input but the table and the backend name."""
        *args, lse = ctx.saved_tensors
        grads = BACKENDS[ctx.backend].backward(*args, ctx.table, lse, dout.to(args[0].dtype).contiguous())
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
