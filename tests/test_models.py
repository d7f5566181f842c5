"""Pano-SD seamlessness and the spherical epipolar-aware module."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

from diffpano.geometry.trajectories import walk
from diffpano.models.epipolar import EpipolarAdapter, epipolar_kwargs
from diffpano.models.seamless import is_seamless, make_seamless
from diffpano.pipelines.factory import tiny_unet_config, tiny_vae_config


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


@pytest.mark.parametrize("shift", [4, 8, 20])
def test_pano_unet_is_equivariant_to_horizontal_rolls(shift):
    unet = make_seamless(tiny_unet())
    x, emb = torch.randn(2, 3, 16, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        rolled_in = unet(torch.roll(x, shift, dims=-1), 10, encoder_hidden_states=emb).sample
        rolled_out = torch.roll(unet(x, 10, encoder_hidden_states=emb).sample, shift, dims=-1)
    assert (rolled_in - rolled_out).abs().max() < 1e-4


def test_plain_unet_is_not_roll_equivariant():
    unet = tiny_unet()
    assert not is_seamless(unet)
    x, emb = torch.randn(1, 3, 16, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        a = unet(torch.roll(x, 8, dims=-1), 10, encoder_hidden_states=emb).sample
        b = torch.roll(unet(x, 10, encoder_hidden_states=emb).sample, 8, dims=-1)
    assert (a - b).abs().max() > 1e-3  # zero padding breaks the symmetry that make_seamless restores


def test_seamless_keeps_weights_and_is_idempotent():
    unet = tiny_unet()
    before = copy.deepcopy(unet.state_dict())
    make_seamless(make_seamless(unet))
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_vae_decoder_is_seamless():
    torch.manual_seed(0)
    vae = make_seamless(AutoencoderKL(**tiny_vae_config()).eval())
    z = torch.randn(1, 4, 8, 16)
    with torch.no_grad():
        a = vae.decode(torch.roll(z, 3, dims=-1)).sample
        b = torch.roll(vae.decode(z).sample, 6, dims=-1)  # the decoder upsamples by 2
    assert (a - b).abs().max() < 1e-4


def test_vae_encoder_is_seamless():
    """The encoder's downsamplers pad right and bottom themselves (diffusers' Downsample2D, padding 0): right wraps."""
    torch.manual_seed(0)
    vae = make_seamless(AutoencoderKL(**tiny_vae_config()).eval())
    x = torch.rand(1, 3, 16, 32) * 2 - 1
    with torch.no_grad():
        a = vae.encode(torch.roll(x, 6, dims=-1)).latent_dist.mean
        b = torch.roll(vae.encode(x).latent_dist.mean, 3, dims=-1)  # the encoder downsamples by 2
    assert (a - b).abs().max() < 1e-4


def multiview_unet(n: int = 4, seed: int = 0):
    unet = make_seamless(tiny_unet(seed))
    adapter = EpipolarAdapter.for_unet(unet, num_ref_views=2, num_samples=4)
    adapter.attach(unet)
    ctx = adapter.context(walk(n, spacing=0.7).unsqueeze(0))
    return unet, adapter, ctx


def test_ea_is_inserted_after_up_block_transformers():
    unet, adapter, _ = multiview_unet()
    assert adapter.config.targets and all(t.startswith("up_blocks.") for t in adapter.config.targets)
    with pytest.raises(ValueError, match="up_blocks"):
        EpipolarAdapter.for_unet(unet, up_blocks=[2])  # the tiny UNet's last up block has no transformer


def test_fresh_ea_modules_give_exactly_the_single_view_output():
    unet, adapter, ctx = multiview_unet()
    x, emb = torch.randn(4, 3, 16, 32), torch.randn(4, 77, 32)
    with torch.no_grad():
        single = unet(x, 500, encoder_hidden_states=emb).sample
        multi = unet(x, 500, encoder_hidden_states=emb, cross_attention_kwargs=epipolar_kwargs(ctx)).sample
    assert torch.equal(single, multi)


def test_trained_ea_modules_mix_views_by_pose():
    unet, adapter, ctx = multiview_unet()
    for block in adapter.blocks.values():
        torch.nn.init.normal_(block.to_out.weight, std=0.2)
    x, emb = torch.randn(4, 3, 16, 32), torch.randn(4, 77, 32)
    other = adapter.context(walk(4, spacing=2.5, turn_deg=30).unsqueeze(0))
    with torch.no_grad():
        single = unet(x, 500, encoder_hidden_states=emb).sample
        multi = unet(x, 500, encoder_hidden_states=emb, cross_attention_kwargs=epipolar_kwargs(ctx)).sample
        moved = unet(x, 500, encoder_hidden_states=emb, cross_attention_kwargs=epipolar_kwargs(other)).sample
        switched_off = unet(x, 500, encoder_hidden_states=emb, cross_attention_kwargs=epipolar_kwargs(None)).sample
    assert (multi - single).abs().max() > 1e-3
    assert (multi - moved).abs().max() > 1e-3  # the output depends on the poses
    assert torch.equal(switched_off, single)


def test_gradients_reach_the_ea_parameters():
    unet, adapter, ctx = multiview_unet()
    x, emb = torch.randn(4, 3, 16, 32), torch.randn(4, 77, 32)
    ea = epipolar_kwargs(ctx)
    unet(x, 500, encoder_hidden_states=emb, cross_attention_kwargs=ea).sample.square().mean().backward()
    for block in adapter.blocks.values():
        assert block.to_out.weight.grad.abs().sum() > 0  # zero-initialised, yet learning starts here
        torch.nn.init.normal_(block.to_out.weight, std=0.1)
    adapter.zero_grad()
    unet(x, 500, encoder_hidden_states=emb, cross_attention_kwargs=ea).sample.square().mean().backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def ea_allocated_bytes(n: int) -> tuple[torch.Size, int]:
    """Output shape and bytes allocated by one EA module forward over n views (sampling cache included)."""
    torch.manual_seed(0)
    adapter = EpipolarAdapter(targets=["x"], channels=[32], num_ref_views=2, num_samples=4)
    ctx = adapter.context(walk(n).unsqueeze(0))
    x = torch.randn(n, 32, 16, 32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = adapter.blocks["x"](x, ctx)
    total = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    return out.shape, total


def test_ea_output_shape_and_memory_grow_linearly_with_views():
    sizes = {n: ea_allocated_bytes(n) for n in (2, 4, 8)}
    for n, (shape, _) in sizes.items():
        assert shape == (n, 32, 16, 32)
    ratio_4, ratio_8 = sizes[4][1] / sizes[2][1], sizes[8][1] / sizes[2][1]
    assert 1.6 < ratio_4 < 2.4 and 3.2 < ratio_8 < 4.8, (ratio_4, ratio_8)  # linear (quadratic would be 4x, 16x)


@pytest.mark.parametrize(
    "kwargs, field", [({"num_ref_views": 0}, "num_ref_views"), ({"num_ref_views": 17}, "num_ref_views"),
                      ({"num_samples": 0}, "num_samples"), ({"num_samples": 65}, "num_samples"),
                      ({"near": 2.0, "far": 1.0}, "near")],
)
def test_k_and_s_out_of_range(kwargs, field):
    _, adapter, _ = multiview_unet()
    with pytest.raises(ValueError, match=field):
        adapter.context(walk(3).unsqueeze(0), **kwargs)
    with pytest.raises(ValueError, match=field):
        EpipolarAdapter(targets=["x"], channels=[32], **kwargs)
