"""Stage-1 LoRA (Pano-SD) on the UNet's attention projections through peft."""

from __future__ import annotations

from diffusers import UNet2DConditionModel
from peft import LoraConfig
from torch import nn

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(unet: UNet2DConditionModel, rank: int = 8, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze the UNet, add LoRA adapters to its attention projections and return the trainable LoRA parameters."""
    if not 1 <= rank <= 512:
        raise ValueError(f"lora_rank: must be in [1, 512], got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=ATTENTION_PROJECTIONS))
    return [p for p in unet.parameters() if p.requires_grad]


def merge_lora(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Fold the LoRA weights into the base projections and drop the adapters, so the UNet saves as a plain one."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet
