"""Tiny random Stable Diffusion directories written by diffusers' own StableDiffusionPipeline.save_pretrained: the
real layout of a downloaded SD 1.x checkpoint (model_index.json, scheduler/, unet/, vae/, text_encoder/, tokenizer/),
with components small enough to build in a second."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# The scheduler config Stable Diffusion 1.x checkpoints ship (PNDM's is theirs; the other classes read the same keys).
SD1_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False)
# The classes real checkpoints name in model_index.json (SD 1.x: PNDM; fine-tunes and SD 2.x: the others).
CHECKPOINT_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                         "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler")


def _clip_tokenizer(words: Path):
    """A CLIP BPE tokenizer over single letters (no merges), written under `words`."""
    from transformers import CLIPTokenizer

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {c: i for i, c in enumerate(letters + [c + "</w>" for c in letters])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    words.mkdir(parents=True, exist_ok=True)
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt")), vocab


def write_tiny_sd(directory: Path, scheduler_class: str = "PNDMScheduler") -> Path:
    """Write a tiny SD directory whose scheduler is `scheduler_class` with SD 1.x's config; returns directory."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffpano.pipelines.factory import tiny_unet_config, tiny_vae_config

    tokenizer, vocab = _clip_tokenizer(Path(f"{directory}-vocab"))
    end = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end))
    unet = UNet2DConditionModel(**tiny_unet_config(4, cross_attention_dim=32) | {"sample_size": 8})
    scheduler = getattr(diffusers, scheduler_class).from_config(SD1_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**tiny_vae_config()), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def with_scheduler_class(src: Path, dst: Path, class_name: str, config: dict | None = None) -> Path:
    """Copy a model directory naming `class_name` in model_index.json (the class need not exist), with `config` as
    its scheduler config when given; returns dst."""
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(config | {"_class_name": class_name}))
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", class_name]}))
    return dst
