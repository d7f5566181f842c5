"""The EA module's forward as first written: every sampled key, value and geometry offset materialised. The oracle."""

from __future__ import annotations

import torch

from diffpano.geometry.spherical import circular_grid_sample
from diffpano.ops.layout import fourier_features


def reference_forward(block, x: torch.Tensor, ctx) -> torch.Tensor:
    """EpipolarAttention.forward computed with grid_sample and dense per-sample tensors (for tests and benchmarks)."""
    b, _, h, w = x.shape
    gn = ctx.poses.shape[0] * ctx.num_views
    copies, hw = b // gn, h * w
    s = ctx.samples(h, w)
    g, n, k, _, ns = s.mask.shape
    grid, mask = s.grid.reshape(g * n * k, hw, ns, 2), s.mask.reshape(g * n, k, hw, ns)
    pe = fourier_features(ctx.geometry_features(s), ctx.pe_freqs).reshape(g * n * k, hw, ns, -1).to(x.dtype)
    offsets = block.geometry_kv(block.geometry(pe)).permute(0, 3, 1, 2)  # (G*N*K, 2I, hw, S)
    heads, hd = block.num_heads, block.head_dim
    xn = block.norm(x)
    q = block.to_q(xn).view(copies, gn, heads, hd, hw) * hd**-0.5
    kv = block.to_kv(xn).view(copies, gn, -1, h, w).transpose(0, 1)
    groups = torch.arange(ctx.poses.shape[0], device=x.device).view(-1, 1, 1) * ctx.num_views
    kv_ref = kv[(groups + ctx.ref_index).reshape(-1)].flatten(1, 2)  # (G*N*K, copies*2I, h, w)
    kv_s = circular_grid_sample(kv_ref, grid).view(gn, k, copies, 2, heads, hd, hw, ns)
    kv_s = kv_s + offsets.reshape(gn, k, 1, 2, heads, hd, hw, ns)
    key, value = kv_s.unbind(3)  # (G*N, K, copies, heads, hd, hw, S)
    q = q.transpose(0, 1)  # (G*N, copies, heads, hd, hw)
    logits = (q[:, None, ..., None] * key).sum(4)  # (G*N, K, copies, heads, hw, S)
    logits = logits.masked_fill(~mask[:, :, None, None], float("-inf"))
    null = torch.einsum("gchdp,hd->gchp", q, block.null_key.to(x.dtype))
    top = torch.maximum(logits.amax(dim=(1, 5)), null)
    weights = (logits - top[:, None, ..., None]).exp()
    weights = weights / (weights.sum((1, 5)) + (null - top).exp())[:, None, ..., None]
    out = (weights.unsqueeze(4) * value).sum((1, 6))  # (G*N, copies, heads, hd, hw)
    return x + block.to_out(out.transpose(0, 1).reshape(b, heads * hd, h, w))
