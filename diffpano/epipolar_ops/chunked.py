"""The EA operator in plain PyTorch, a block of rows at a time: any device, bounded memory, autograd by recomputation."""

from __future__ import annotations

import torch

from diffpano.epipolar_ops.layout import SampleTable, corner_rows

CHUNK_BYTES = 8 << 20  # sampled keys and values materialised at once


def row_blocks(kv: torch.Tensor, samples: int) -> list[slice]:
    """Row ranges whose sampled keys and values take about CHUNK_BYTES each."""
    copies, rows, two, heads, dim = kv.shape
    step = max(1, CHUNK_BYTES // (copies * samples * 4 * two * heads * dim * kv.element_size()))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def block(q, kv, qg, nl, code, corners: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (copies, n, heads, dim + rank) and log-sum-exp (copies, n, heads) of n rows (q, qg, nl, code: theirs)."""
    index, weights, valid = corners
    n, samples = valid.shape
    copies, _, _, heads, dim = kv.shape
    gathered = kv.flatten(2)[:, index.reshape(-1)].view(copies, n, samples, 4, 2, heads, dim)
    keys, values = torch.einsum("cnjtxhd,njt->cnjxhd", gathered, weights.to(kv.dtype)).unbind(3)
    logits = torch.einsum("cnhd,cnjhd->cnhj", q, keys) + torch.einsum("cnhr,njr->cnhj", qg, code)
    logits = torch.cat((logits.masked_fill(~valid[None, :, None], float("-inf")), nl[..., None]), dim=-1).float()
    lse = torch.logsumexp(logits, dim=-1)
    attn = (logits - lse[..., None]).exp().to(kv.dtype)[..., :-1]
    out = torch.cat((torch.einsum("cnhj,cnjhd->cnhd", attn, values), torch.einsum("cnhj,njr->cnhr", attn, code)), -1)
    return out, lse


def forward(q, kv, qg, nl, code, table: SampleTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp of all rows, block by block."""
    parts = [
        block(q[:, r], kv, qg[:, r], nl[:, r], code[r], corner_rows(table, r)) for r in row_blocks(kv, code.shape[1])
    ]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def backward(q, kv, qg, nl, code, table: SampleTable, lse: torch.Tensor, dout: torch.Tensor) -> tuple:
    """Gradients of (q, kv, qg, nl, code), recomputing each block's samples under autograd."""
    dq, dkv, dqg, dnl, dcode = (torch.zeros_like(t) for t in (q, kv, qg, nl, code))
    for r in row_blocks(kv, code.shape[1]):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q[:, r], kv, qg[:, r], nl[:, r], code[r])]
            out, _ = block(*leaves, corner_rows(table, r))
            got = torch.autograd.grad(out, leaves, dout[:, r])
        dq[:, r], dqg[:, r], dnl[:, r], dcode[r] = got[0], got[2], got[3], got[4]
        dkv += got[1]
    return dq, dkv, dqg, dnl, dcode
