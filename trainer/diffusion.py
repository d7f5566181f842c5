"""Stages 1 (Pano-SD) and 2 (EA modules) for the training skeleton (trainer.skeleton): what trains, the denoising
loss of a batch, the export."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from diffpano.data.loaders import ClipDataset, PanoramaDataset
from diffpano.io import storage
from diffpano.models.epipolar import epipolar_kwargs
from diffpano.models.lora import add_lora, merge_lora, save_lora
from diffpano.pipelines.loading import save_model
from trainer import skeleton
from trainer.cache import load_latent_cache, load_text_cache
from trainer.config import TrainConfig
from trainer.data import LatentClipDataset, LatentPanoramaDataset
from trainer.skeleton import DTYPES, Loss, Stage, Worker


class Denoiser(nn.Module):
    """UNet plus EA modules as one module, so DDP sees every trainable parameter; predicts noise (or v)."""

    def __init__(self, unet: nn.Module, epipolar: nn.Module) -> None:
        super().__init__()
        self.unet, self.epipolar = unet, epipolar

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, ctx=None) -> torch.Tensor:
        """Model output for noisy inputs (B, c, h, w) at timesteps (B,); ctx lays out B = tours x views."""
        return self.unet(x, t, encoder_hidden_states=emb, cross_attention_kwargs=epipolar_kwargs(ctx)).sample


def trainable_parameters(pipe, stage: int, stage_cfg) -> list[nn.Parameter]:
    """Freeze what the stage keeps fixed and return what it trains (LoRA, the UNet, or the EA modules)."""
    for module in (pipe.text_encoder, pipe.vae, pipe.unet, pipe.epipolar):
        if module is not None:
            module.requires_grad_(False)
    params: list[nn.Parameter] = []
    if stage_cfg.lora_rank:
        params += add_lora(pipe.unet, stage_cfg.lora_rank, stage_cfg.lora_alpha, stage_cfg.lora_targets)
    elif stage == 1:
        pipe.unet.requires_grad_(True)
        params += list(pipe.unet.parameters())
    if stage == 2:
        if stage_cfg.train_unet and not stage_cfg.lora_rank:
            pipe.unet.requires_grad_(True)
            params += list(pipe.unet.parameters())
        pipe.epipolar.requires_grad_(True)
        params += list(pipe.epipolar.parameters())
    return params


def make_dataset(cfg: TrainConfig, stage: int, latents: dict | None, factor: int):
    """The stage's torch dataset: images, or cached latents when the model works in latent space."""
    d = cfg.data
    common = dict(size=cfg.size(stage), yaw_augment=d.yaw_augment, flip_prob=d.flip_prob,
                  caption_dropout=d.caption_dropout, seed=cfg.run.seed)
    if stage in (0, 1):  # stage 0 (the VAE) reads panoramas as stage 1 does
        if latents is not None:
            return LatentPanoramaDataset(d.dataset, latents=latents, factor=factor, **common)
        return PanoramaDataset(d.dataset, **common)
    views, k = cfg.stage2.views, cfg.model.num_ref_views
    if latents is not None:
        return LatentClipDataset(d.dataset, num_views=views, num_ref_views=k, latents=latents, factor=factor, **common)
    return ClipDataset(d.dataset, num_views=views, num_ref_views=k, **common)


class TextTable:
    """The text cache staged on the training device: embeddings (..., L, D) of captions by one indexed read."""

    def __init__(self, cache: dict[str, np.ndarray], device: torch.device) -> None:
        self.index = {caption: i for i, caption in enumerate(cache)}
        self.table = torch.from_numpy(np.stack(list(cache.values()))).to(device)
        self.pinned = device.type == "cuda"

    def __call__(self, captions: list) -> torch.Tensor:
        """Embeddings of captions (a list, or a list of lists for clips)."""
        nested = bool(captions) and isinstance(captions[0], list | tuple)
        rows = [[self.index[c] for c in group] for group in captions] if nested else [self.index[c] for c in captions]
        index = torch.tensor(rows)
        if self.pinned:  # an asynchronous copy: the step does not wait for the GPU to drain
            index = index.pin_memory().to(self.table.device, non_blocking=True)
        return self.table[index]


class SignalToNoise:
    """alpha_bar / (1 - alpha_bar) per timestep, staged on the device once (diffusers' compute_snr copies it
    to the device on every call, which waits for the GPU)."""

    def __init__(self, scheduler: DDPMScheduler, device: torch.device) -> None:
        self.scheduler = scheduler
        alphas = scheduler.alphas_cumprod.to(device)
        self.snr = alphas / (1 - alphas)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """The SNR at timesteps t."""
        return self.snr[t].float()


def diffusion_loss(model_out, x0, noise, t, snr: SignalToNoise, prediction_type: str, gamma: float | None
                   ) -> torch.Tensor:
    """MSE to the noise (or v), optionally min-SNR weighted (Hang et al. 2023)."""
    target = noise if prediction_type == "epsilon" else snr.scheduler.get_velocity(x0, noise, t)
    per = F.mse_loss(model_out.float(), target.float(), reduction="none").mean(dim=tuple(range(1, x0.ndim)))
    if gamma is None:
        return per.mean()
    ratio = snr(t)
    weight = torch.clamp(ratio, max=gamma) / (ratio if prediction_type == "epsilon" else ratio + 1)
    return (per * weight).mean()


def sample_tour(pipe, cfg: TrainConfig, stage: int, captions: list[str], uri: str) -> None:
    """A small sample tour from the current weights, saved as one PNG strip."""
    from diffpano.geometry.trajectories import walk
    from diffpano.io.manifest import png_bytes

    views = len(captions)
    h, w = cfg.size(stage)
    out = pipe(captions, walk(views, spacing=0.5), height=h, width=w, num_inference_steps=cfg.run.sample_steps,
               guidance_scale=3.0, seed=cfg.run.seed)
    storage.write_bytes(uri, png_bytes(np.concatenate(list(out.images[0]), axis=0)))


def train_stage(config: dict) -> None:
    """train_loop_per_worker of stage 1 or 2 (config["stage"]), resumed from Ray Train's latest checkpoint."""
    skeleton.run(config, DiffusionStage)


class DiffusionStage(Stage):
    """Stage 1 (the UNet or its LoRA on panoramas) or stage 2 (the EA modules on clips): the denoising objective."""

    def __init__(self, w: Worker) -> None:
        super().__init__(w)
        cfg, pipe = w.cfg, w.pipe
        self.number = int(w.config["stage"])
        self.settings = cfg.stage1 if self.number == 1 else cfg.stage2
        self.params = trainable_parameters(pipe, self.number, self.settings)
        self.model = Denoiser(pipe.unet, pipe.epipolar).train()
        self.amp = DTYPES[cfg.optim.mixed_precision]
        self.fp16 = self.amp == torch.float16
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=cfg.optim.prediction_type)
        self.snr = SignalToNoise(self.noise, w.device)
        self.text = TextTable(load_text_cache(w.config["text_cache"]), w.device)
        latents = load_latent_cache(w.config["latent_cache"]) if w.config.get("latent_cache") else None
        self.dataset = make_dataset(cfg, self.number, latents, pipe.vae_factor)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> Loss:
        """Noise the batch at one random timestep per tour and score the model's prediction (diffusion_loss)."""
        cfg, device, clips = self.w.cfg, self.w.device, self.number == 2
        x0 = skeleton.to_device(batch["images"].flatten(0, 1) if clips else batch["image"], self.w)
        emb = self.text(batch["captions"] if clips else batch["caption"])
        emb = emb.flatten(0, 1) if clips else emb
        b = batch["images"].shape[0] if clips else x0.shape[0]
        t = torch.randint(0, self.noise.config.num_train_timesteps, (b,), generator=generator, device=device)
        t = t.repeat_interleave(x0.shape[0] // b)  # views per tour (1 in stage 1) share a timestep
        noise = torch.randn(x0.shape, generator=generator, device=device)
        noisy = self.noise.add_noise(x0, noise, t)
        m = cfg.model
        epi = None
        if clips:
            epi = self.w.pipe.epipolar.context(batch["poses"], m.num_ref_views, m.num_samples)
            self.w.pipe.epipolar.prepare(epi, self.w.pipe.unet, *x0.shape[-2:], x0.dtype)
        with skeleton.autocast(device, self.amp):
            out = model(noisy, t, emb, epi)
        o = cfg.optim
        return Loss(diffusion_loss(out, x0, noise, t, self.snr, o.prediction_type, o.min_snr_gamma), b)

    def sample(self, batch: dict, step: int) -> None:
        """Sample panoramas from the current weights beside the checkpoints."""
        captions = [c or "a room" for c in (batch["captions"][0] if self.number == 2 else batch["caption"][:2])]
        pipe = self.w.pipe
        pipe.unet.eval()
        try:
            uri = storage.join(self.w.config["run_root"], "samples", f"stage{self.number}-step{step:06d}.png")
            sample_tour(pipe, self.w.cfg, self.number, captions, uri)
        finally:
            pipe.unet.train()

    def export(self, step: int) -> None:
        """The stage's model directory (a stage-1 LoRA also alone, then merged) and a final sample."""
        pipe, stage, run_root = self.w.pipe, self.number, self.w.config["run_root"]
        if self.settings.lora_rank:
            if stage == 1:
                save_lora(pipe.unet, self.w.config["lora"])
            merge_lora(pipe.unet)
        pipe.unet.eval()
        pipe.epipolar.eval()
        pipe.model_name = f"{Path(run_root).name}-stage{stage}@{step}"
        export = self.w.config["export"]
        save_model(pipe, export)
        storage.write_bytes(storage.join(export, "training.json"),
                            json.dumps({"stage": stage, "steps": step, "config": self.w.cfg.model_dump(mode="json")},
                                       indent=2).encode())
        captions = ["a bedroom with blue walls", "a kitchen with white walls"]
        with contextlib.suppress(Exception):  # a sample is a courtesy; the export is what matters
            sample_tour(pipe, self.w.cfg, stage, captions, storage.join(run_root, "samples", f"stage{stage}-final.png"))
        print(f"stage{stage}: exported {export}", flush=True)
