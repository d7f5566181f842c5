"""Stage 0, the loop of a Ray Train worker or a local session: the VAE of a fresh latent model on the panoramas, or
the decoder of a base model's VAE."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from torch import nn

from diffpano.modelio import load_model, save_model
from trainer import session
from trainer.config import TrainConfig
from trainer.loop import (
    Batches,
    RunLog,
    _seed,
    allow_tf32,
    load_state,
    log_and_checkpoint,
    make_dataset,
    maybe_fail,
    out_of_time,
    save_state,
)

SCALE_SAMPLES = 64  # panoramas whose latents set the VAE's scaling_factor (unit variance for the UNet)


class Reconstruct(nn.Module):
    """The VAE as one module for DDP: reconstruction and KL of a batch."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, mean KL per latent element) of images in [-1, 1]."""
        posterior = self.vae.encode(x).latent_dist  # no graph through an encoder frozen by decoder_only
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        return self.vae.decode(z).sample, posterior.kl().mean() / posterior.mean[0].numel()


def strips(x: torch.Tensor, rows: int | None, generator: torch.Generator) -> torch.Tensor:
    """Random full-width strips of `rows` rows (the longitude stays a whole circle), or x when rows is None."""
    if rows is None or rows >= x.shape[-2]:
        return x
    top = torch.randint(0, x.shape[-2] - rows + 1, (x.shape[0],), generator=generator)
    return torch.stack([img[:, t : t + rows] for img, t in zip(x, top.tolist(), strict=True)])


def train_vae(config: dict) -> None:
    """train_loop_per_worker of stage 0: L1 reconstruction + KL, then the scaling factor, then the export."""
    cfg = TrainConfig.model_validate(config["cfg"])
    vcfg, run_root = cfg.vae, config["run_root"]
    rank, world = session.rank_and_world()
    device = session.device()
    _seed(cfg.run.seed * 1000 + rank)
    allow_tf32(cfg, device)
    pipe = load_model(config["init_model"], device, torch.float32)
    for module in (pipe.unet, pipe.text_encoder, pipe.epipolar):
        module.requires_grad_(False)
    if vcfg.decoder_only:
        for module in (pipe.vae.encoder, pipe.vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    params = [p for p in pipe.vae.parameters() if p.requires_grad]
    model = Reconstruct(pipe.vae).train()
    ddp = session.prepare(model)
    optimizer = torch.optim.AdamW(params, lr=vcfg.lr)
    lr_sched = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=vcfg.warmup_steps)
    step, consumed = 0, 0
    with session.latest_checkpoint() as d:
        if d is not None:
            step, consumed = load_state(d, params, optimizer, lr_sched, None, rank)
    dataset = make_dataset(cfg, 0, None, 1)
    data = Batches(dataset, vcfg.batch_size, rank, world, cfg.run.seed, cfg.data.loader_workers, 1, consumed)
    log = RunLog(run_root, 0) if rank == 0 else None
    generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + rank * 104729 + step)
    began = time.monotonic()
    while step < vcfg.steps:
        maybe_fail(cfg, step, rank, world, run_root)
        started = time.perf_counter()
        x = strips(next(data)["image"], vcfg.strip_rows, generator).to(device)
        recon, kl = ddp(x, generator)
        l1 = F.l1_loss(recon, x)
        loss = l1 + vcfg.kl_weight * kl
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics = {"loss": loss.item(), "l1": l1.item(), "kl": kl.item(), "lr": lr_sched.get_last_lr()[0],
                   "grad_norm": grad_norm, "samples_per_s": x.shape[0] * world / (time.perf_counter() - started),
                   "step": step, "time": time.time()}
        stop = out_of_time(began, vcfg.time_limit_s, world, device)
        log_and_checkpoint(cfg, log, metrics, step if stop else vcfg.steps,
                           partial(save_state, params=params, optimizer=optimizer, lr_sched=lr_sched,
                                   ema=None, step=step, consumed=data.consumed, rank=rank))
        if stop:
            break
    if rank == 0:
        pipe.vae.eval()
        if not vcfg.decoder_only:  # an unchanged encoder keeps the scaling_factor the UNet was trained with
            pipe.vae.register_to_config(scaling_factor=latent_scale(pipe, dataset))
        pipe.model_name = f"{Path(run_root).name}-vae@{step}"
        save_model(pipe, config["export"])
        print(f"vae: exported {config['export']} (scaling_factor {pipe.vae.config.scaling_factor:.4f})", flush=True)


@torch.no_grad()
def latent_scale(pipe, dataset) -> float:
    """1 / std of the latent means of up to SCALE_SAMPLES panoramas (Stable Diffusion's 0.18215, measured)."""
    images = torch.stack([dataset[i]["image"] for i in range(min(len(dataset), SCALE_SAMPLES))])
    means = torch.cat([pipe.vae.encode(chunk.to(pipe.device)).latent_dist.mean for chunk in images.split(8)])
    return float(1.0 / means.std().clamp_min(1e-6))
