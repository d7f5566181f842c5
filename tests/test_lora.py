"""Stage-1 LoRA through peft: only adapters train, the seam stays closed, merging keeps the function."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffpano.factory import tiny_unet_config
from diffpano.lora import add_lora, merge_lora
from diffpano.seamless import make_seamless


def test_lora_trains_only_adapters_and_merges_into_a_plain_seamless_unet(tmp_path):
    torch.manual_seed(0)
    unet = make_seamless(UNet2DConditionModel(**tiny_unet_config()).eval())
    x, emb = torch.randn(1, 3, 16, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = unet(x, 10, encoder_hidden_states=emb).sample
    params = add_lora(unet, rank=4)
    total = sum(p.numel() for p in unet.parameters())
    assert params and all("lora" in n for n, p in unet.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in params) < 0.1 * total
    with torch.no_grad():
        assert torch.allclose(unet(x, 10, encoder_hidden_states=emb).sample, base)  # LoRA starts as a no-op
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)  # as after some training
        tuned = unet(x, 10, encoder_hidden_states=emb).sample
        rolled = unet(torch.roll(x, 8, -1), 10, encoder_hidden_states=emb).sample
    assert (tuned - base).abs().max() > 1e-4
    assert (rolled - torch.roll(tuned, 8, -1)).abs().max() < 1e-4  # still seamless
    merge_lora(unet)
    assert not any("lora" in n for n in unet.state_dict())
    unet.save_pretrained(tmp_path / "unet")
    reloaded = make_seamless(UNet2DConditionModel.from_pretrained(tmp_path / "unet"))
    with torch.no_grad():
        assert (reloaded(x, 10, encoder_hidden_states=emb).sample - tuned).abs().max() < 1e-4


def test_bad_rank():
    with pytest.raises(ValueError, match="lora_rank"):
        add_lora(UNet2DConditionModel(**tiny_unet_config()), rank=0)
