"""The EA operator in plain PyTorch, a block of rows at a time: any device, bounded memory, autograd by recomputing."""

from __future__ import annotations

import torch

from diffpano.ops.layout import SampleTable, corner_rows

CHUNK_BYTES = 8 << 20  # sampled keys and values materialised at once


def row_blocks(kv: torch.Tensor, samples: int) -> list[slice]:
    """Row ranges whose sampled keys and values take about CHUNK_BYTES each."""
    copies, rows, two, heads, dim = kv.shape
    step = max(1, CHUNK_BYTES // (copies * samples * 4 * two * heads * dim * kv.element_size()))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def block(q, kv, code, geo_k, geo_v, null_key, corners: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (copies, n, heads, dim) and log-sum-exp (copies, n, heads) of n rows (q and code: theirs)."""
    index, weights, valid = corners
    n, samples = valid.shape
    copies, _, _, heads, dim = kv.shape
    gathered = kv.flatten(2)[:, index.reshape(-1)].view(copies, n, samples, 4, 2, heads, dim)
    keys, values = torch.einsum("cnjtxhd,njt->cnjxhd", gathered, weights.to(kv.dtype)).unbind(3)
    qg = torch.einsum("cnhd,hdr->cnhr", q, geo_k)
    logits = torch.einsum("cnhd,cnjhd->cnhj", q, keys) + torch.einsum("cnhr,njr->cnhj", qg, code)
    null = torch.einsum("cnhd,hd->cnh", q, null_key)
    logits = torch.cat((logits.masked_fill(~valid[None, :, None], float("-inf")), null[..., None]), dim=-1).float()
    lse = torch.logsumexp(logits, dim=-1)
    attn = (logits - lse[..., None]).exp().to(kv.dtype)[..., :-1]
    out = torch.einsum("cnhj,cnjhd->cnhd", attn, values)
    out = out + torch.einsum("hdr,cnhr->cnhd", geo_v, torch.einsum("cnhj,njr->cnhr", attn, code))
    return out, lse


def forward(q, kv, code, geo_k, geo_v, null_key, table: SampleTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and log-sum-exp of all rows, block by block."""
    parts = [
        block(q[:, r], kv, code[r], geo_k, geo_v, null_key, corner_rows(table, r))
        for r in row_blocks(kv, code.shape[1])
    ]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def backward(q, kv, code, geo_k, geo_v, null_key, table: SampleTable, lse: torch.Tensor, dout: torch.Tensor) -> tuple:
    """Gradients of (q, kv, code, geo_k, geo_v, null_key), recomputing each block's samples under autograd."""
    dq, dkv, dcode, dgeo_k, dgeo_v, dnull = (torch.zeros_like(t) for t in (q, kv, code, geo_k, geo_v, null_key))
    for r in row_blocks(kv, code.shape[1]):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q[:, r], kv, code[r], geo_k, geo_v, null_key)]
            out, _ = block(*leaves, corner_rows(table, r))
            got = torch.autograd.grad(out, leaves, dout[:, r])
        dq[:, r], dcode[r] = got[0], got[2]
        for total, part in zip((dkv, dgeo_k, dgeo_v, dnull), (got[1], *got[3:]), strict=True):
            total += part
    return dq, dkv, dcode, dgeo_k, dgeo_v, dnull
