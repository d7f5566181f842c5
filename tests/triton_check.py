"""Run by test_epipolar_ops in a subprocess with TRITON_INTERPRET=1: the Triton kernels against the oracle, as JSON."""

from __future__ import annotations

import copy
import json
import sys

import torch
from torch import nn

from diffpano.geometry.trajectories import walk
from diffpano.models.epipolar import EpipolarAdapter
from diffpano.ops.reference import reference_forward


def errors(dtype: torch.dtype, k: int, s: int) -> dict:
    """Relative errors of the forward's EA contribution and of all gradients (module run through backend 'triton')."""
    torch.manual_seed(0)
    adapter = EpipolarAdapter(targets=["x"], channels=[32], num_ref_views=k, num_samples=s, geometry_rank=4)
    block = adapter.blocks["x"]
    for p in block.parameters():
        nn.init.normal_(p, std=0.2)
    ctx = adapter.context(walk(3, spacing=1.0, turn_deg=40).unsqueeze(0))
    x = torch.randn(2 * 3, 32, 4, 8)  # two copies of 3 views; 4 x 8 maps cross the seam at every row
    xr, xf = x.clone().requires_grad_(), x.clone().to(dtype).requires_grad_()
    want = reference_forward(block, xr, ctx)
    fused = copy.deepcopy(block).to(dtype)
    got = fused(xf, ctx, backend="triton")
    grad = torch.randn_like(want)
    got_g = torch.autograd.grad(got, [xf, *fused.parameters()], grad.to(dtype))
    want_g = torch.autograd.grad(want, [xr, *block.parameters()], grad)
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()  # noqa
    return {"forward": rel(got - xf, want - xr), "grad": max(rel(a, b) for a, b in zip(got_g, want_g, strict=True))}


if __name__ == "__main__":
    cases = {"fp32-k2-s4": (torch.float32, 2, 4), "fp32-k3-s1": (torch.float32, 3, 1),
             "fp16-k2-s4": (torch.float16, 2, 4)}
    json.dump({name: errors(*args) for name, args in cases.items()}, sys.stdout)
