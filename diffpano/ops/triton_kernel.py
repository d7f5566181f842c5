"""The EA operator as Triton kernels (CUDA; also runs under Triton's CPU interpreter, which the tests use).

One program handles BLOCK rows of one head of one copy: it gathers each sample's four bilinear corners straight from
the key/value maps, keeps an online softmax over the K*S samples and the null token in registers, and writes only the
output and the log-sum-exp. The backward recomputes the samples: a first pass for the softmax's correction term, a
second for the gradients, scattered into keys, values and codes with atomic adds (fp32 buffers); the weight
gradients are summed per program and reduced by PyTorch. Inputs may be fp32, bf16 or fp16; arithmetic is fp32.
"""

from __future__ import annotations

import torch

from diffpano.ops.layout import SampleTable

BLOCK = 32  # rows per program
INTERPRET_ENV = "TRITON_INTERPRET"  # "1" before the first call: Triton's CPU interpreter runs the kernels (tests)


def available() -> bool:
    """Whether the kernels can run on CUDA here (Triton importable and a GPU present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(head_dim: int) -> bool:
    """Whether the head size suits the kernels (a power of two from 16 to 256: tl.arange and register tiles)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def kernels():
    """The jitted (forward, backward) kernels; Triton reads $TRITON_INTERPRET when they are first imported."""
    from diffpano.ops import triton_defs

    return triton_defs.forward_kernel, triton_defs.backward_kernel


def _launch(q: torch.Tensor, code: torch.Tensor, table: SampleTable) -> tuple[tuple, list, dict]:
    """Grid, size arguments and compile-time constants of a call."""
    copies, rows, heads, dim = q.shape
    rank = code.shape[-1]
    grid = (-(-rows // BLOCK), heads, copies)
    sizes = [rows, heads, code.shape[1], rank, table.width]
    return grid, sizes, dict(DIM=dim, RANK_P=max(16, 1 << (rank - 1).bit_length()), BLOCK_R=BLOCK)


def forward(q, kv, code, geo_k, geo_v, null_key, table: SampleTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (copies, rows, heads, dim) and log-sum-exp (copies, rows, heads) in fp32."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    grid, sizes, consts = _launch(q, code, table)
    kernels()[0][grid](q, kv, code, geo_k, geo_v, null_key, table.base, table.frac, out, lse, *sizes, **consts)
    return out, lse


def backward(q, kv, code, geo_k, geo_v, null_key, table: SampleTable, lse: torch.Tensor, dout: torch.Tensor) -> tuple:
    """Gradients of (q, kv, code, geo_k, geo_v, null_key)."""
    grid, sizes, consts = _launch(q, code, table)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dkv, dcode = torch.zeros(kv.shape, **f32), torch.zeros(code.shape, **f32)
    parts = grid[0] * grid[2]
    dgk, dgv = torch.zeros(parts, *geo_k.shape, **f32), torch.zeros(parts, *geo_v.shape, **f32)
    dnull = torch.zeros(parts, *null_key.shape, **f32)
    kernels()[1][grid](q, kv, code, geo_k, geo_v, null_key, table.base, table.frac, lse, dout,
                       dq, dkv, dcode, dgk, dgv, dnull, *sizes, **consts)
    return dq, dkv.to(kv.dtype), dcode.to(code.dtype), dgk.sum(0), dgv.sum(0), dnull.sum(0)
