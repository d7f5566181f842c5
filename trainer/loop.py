"""The training loop of a Ray Train worker or a local session, for stage 1 (Pano-SD) and stage 2 (EA modules)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from diffpano import storage
from diffpano.data.loaders import ClipDataset, PanoramaDataset, collate_clips
from diffpano.lora import add_lora, merge_lora
from diffpano.modelio import load_model, save_model
from trainer import session
from trainer.cache import load_latent_cache, load_text_cache
from trainer.config import TrainConfig
from trainer.data import LatentClipDataset, LatentPanoramaDataset

STATE_FILE = "state.pt"
DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Denoiser(nn.Module):
    """UNet plus EA modules as one module, so DDP sees every trainable parameter; predicts noise (or v)."""

    def __init__(self, unet: nn.Module, epipolar: nn.Module) -> None:
        super().__init__()
        self.unet, self.epipolar = unet, epipolar

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, ctx=None) -> torch.Tensor:
        """Model output for noisy inputs (B, c, h, w) at timesteps (B,); ctx lays out B = tours x views."""
        with self.epipolar.use(ctx):
            return self.unet(x, t, encoder_hidden_states=emb).sample


def trainable_parameters(pipe, stage: int, stage_cfg) -> list[nn.Parameter]:
    """Freeze what the stage keeps fixed and return what it trains (LoRA, the UNet, or the EA modules)."""
    for module in (pipe.text_encoder, pipe.vae, pipe.unet, pipe.epipolar):
        if module is not None:
            module.requires_grad_(False)
    params: list[nn.Parameter] = []
    if stage_cfg.lora_rank:
        params += add_lora(pipe.unet, stage_cfg.lora_rank, stage_cfg.lora_alpha)
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


def allow_tf32(cfg: TrainConfig, device: torch.device) -> None:
    """TF32 matmuls and convolutions on a CUDA device when the config allows them."""
    if device.type == "cuda" and cfg.optim.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def _seed(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


class Batches:
    """Endless batches of this worker's shard, epoch after epoch, starting at any number of consumed batches."""

    def __init__(self, dataset, batch_size: int, rank: int, world: int, seed: int, workers: int, stage: int,
                 consumed: int) -> None:
        self.dataset, self.batch_size, self.workers, self.stage = dataset, batch_size, workers, stage
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.per_epoch = max(1, len(self.sampler) // batch_size)
        self.consumed = consumed
        self._it = None

    def _open(self) -> None:
        """A loader for the epoch of `consumed`, skipping the batches already used (by index, nothing is decoded)."""
        epoch, skip = divmod(self.consumed, self.per_epoch)
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        indices = list(self.sampler)[skip * self.batch_size : self.per_epoch * self.batch_size]
        if len(indices) < self.batch_size:  # a shard smaller than a batch: repeat it
            indices = (indices * (self.batch_size // max(1, len(indices)) + 1))[: self.batch_size]
        self._it = iter(DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, drop_last=True,
                                   num_workers=self.workers, collate_fn=collate_clips if self.stage == 2 else None))

    def __next__(self) -> dict:
        """The next batch."""
        if self._it is None:
            self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = None
            self.consumed = (self.consumed // self.per_epoch + 1) * self.per_epoch
            return next(self)
        self.consumed += 1
        return batch


def embed(cache: dict[str, np.ndarray], captions: list) -> torch.Tensor:
    """Cached text embeddings (..., L, D) of captions (a list, or a list of lists for clips)."""
    if captions and isinstance(captions[0], list | tuple):
        return torch.stack([embed(cache, list(c)) for c in captions])
    return torch.from_numpy(np.stack([cache[c] for c in captions]))


def diffusion_loss(model_out, x0, noise, t, scheduler, prediction_type: str, gamma: float | None) -> torch.Tensor:
    """MSE to the noise (or v), optionally min-SNR weighted (Hang et al. 2023)."""
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    per = F.mse_loss(model_out.float(), target.float(), reduction="none").mean(dim=tuple(range(1, x0.ndim)))
    if gamma is None:
        return per.mean()
    snr = compute_snr(scheduler, t)
    weight = torch.clamp(snr, max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    return (per * weight).mean()


class RunLog:
    """Rank 0's per-step metrics: CSV, TensorBoard, a progress line; synced to the run's storage."""

    def __init__(self, run_root: str, stage: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_root, "logs", f"stage{stage}")
        self.local = Path(tempfile.mkdtemp(prefix="diffpano-log-"))
        csv_uri = storage.join(self.remote, "metrics.csv")
        if storage.exists(csv_uri):  # a resumed run continues the file
            (self.local / "metrics.csv").write_bytes(storage.read_bytes(csv_uri))
        self.writer = SummaryWriter(str(self.local / "tensorboard"))
        self.stage = stage

    def step(self, step: int, total: int, metrics: dict) -> None:
        """Record one optimiser step."""
        path = self.local / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", *sorted(metrics)])
            if new:
                w.writeheader()
            w.writerow({"step": step, **metrics})
        shown = {k: v for k, v in metrics.items() if k != "time"}  # wall-clock time only goes to the CSV
        for key, value in shown.items():
            self.writer.add_scalar(f"stage{self.stage}/{key}", value, step)
        print(f"stage{self.stage} step {step}/{total} " + " ".join(f"{k} {v:.4g}" for k, v in shown.items()),
              flush=True)

    def sync(self) -> None:
        """Copy the logs to the run's storage."""
        self.writer.flush()
        storage.copy_tree(str(self.local), self.remote)


def save_state(directory: Path, params, optimizer, lr_sched, ema, step: int, consumed: int, rank: int) -> None:
    """Trainable weights, optimiser, LR schedule, EMA, step and data position (rank 0), RNG state (every rank)."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(rng, directory / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({
            "params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_sched.state_dict(), "ema": ema.state_dict() if ema else None,
            "step": step, "consumed": consumed,
        }, directory / STATE_FILE)


def load_state(directory: Path, params, optimizer, lr_sched, ema, rank: int) -> tuple[int, int]:
    """Restore what save_state wrote; returns (step, consumed batches)."""
    state = torch.load(directory / STATE_FILE, weights_only=False)
    with torch.no_grad():
        for p, saved in zip(params, state["params"], strict=True):
            p.copy_(saved.to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return int(state["step"]), int(state["consumed"])


def log_and_checkpoint(cfg: TrainConfig, log: RunLog | None, metrics: dict, total: int,
                       save: Callable[[Path], None]) -> None:
    """Log a step on rank 0; every run.checkpoint_every steps (and at the end) report a checkpoint save() wrote."""
    step = metrics["step"]
    if log is not None and (step % cfg.run.log_every == 0 or step == total):
        log.step(step, total, {k: v for k, v in metrics.items() if k != "step"})
    if step % cfg.run.checkpoint_every == 0 or step == total:
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            if log is not None:
                log.sync()
            session.report(metrics, Path(tmp))


def out_of_time(began: float, limit: float | None, world: int, device: torch.device) -> bool:
    """True once the stage has trained `limit` seconds in this attempt; rank 0's clock decides for every worker."""
    if limit is None:
        return False
    flag = torch.tensor([float(time.monotonic() - began > limit)], device=device)
    if world > 1:  # every worker must leave the loop at the same step, or the next all-reduce hangs
        torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def maybe_fail(cfg: TrainConfig, step: int, rank: int, world: int, run_root: str) -> None:
    """Fault injection for tests: once `run.fail_at_step` steps are done (a checkpoint of that step already reported),
    the last worker's process dies by SIGKILL, as an out-of-memory kill or a lost node ends one: no exception, no
    cleanup.

    RUN_ROOT/injected-failure-STEP records the process id and the time of death ({"pid", "time"}); while it exists
    the failure is not injected again, so the restarted worker group goes on. In a local session (`--local`) the
    process that dies is the command itself, since nothing is there to restart it.
    """
    if cfg.run.fail_at_step != step or rank != world - 1:
        return
    marker = storage.join(run_root, f"injected-failure-{step}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, json.dumps({"pid": os.getpid(), "time": time.time()}).encode())
    os.kill(os.getpid(), signal.SIGKILL)


def sample_tour(pipe, cfg: TrainConfig, stage: int, captions: list[str], uri: str) -> None:
    """A small sample tour from the current weights, saved as one PNG strip."""
    from diffpano.manifest import png_bytes
    from diffpano.trajectories import walk

    views = len(captions)
    h, w = cfg.size(stage)
    out = pipe(captions, walk(views, spacing=0.5), height=h, width=w, num_inference_steps=cfg.run.sample_steps,
               guidance_scale=3.0, seed=cfg.run.seed)
    storage.write_bytes(uri, png_bytes(np.concatenate(list(out.images[0]), axis=0)))


def train_stage(config: dict) -> None:
    """train_loop_per_worker: one stage, resumed from Ray Train's latest checkpoint when there is one."""
    cfg = TrainConfig.model_validate(config["cfg"])
    stage, run_root = int(config["stage"]), config["run_root"]
    stage_cfg = cfg.stage1 if stage == 1 else cfg.stage2
    rank, world = session.rank_and_world()
    device = session.device()
    _seed(cfg.run.seed * 1000 + rank)
    allow_tf32(cfg, device)
    pipe = load_model(config["init_model"], device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    params = trainable_parameters(pipe, stage, stage_cfg)
    pipe.epipolar.enabled = stage == 2
    model = Denoiser(pipe.unet, pipe.epipolar)
    model.train()
    ddp = session.prepare(model)
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    lr_sched = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=stage_cfg.warmup_steps)
    ema = EMAModel(params, decay=stage_cfg.ema.decay) if stage_cfg.ema.enabled else None
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=cfg.optim.prediction_type)
    text = load_text_cache(config["text_cache"])
    latents = load_latent_cache(config["latent_cache"]) if config.get("latent_cache") else None
    step, consumed = 0, 0
    with session.latest_checkpoint() as d:
        if d is not None:
            step, consumed = load_state(d, params, optimizer, lr_sched, ema, rank)
    if ema is not None:
        ema.to(device)
    data = Batches(make_dataset(cfg, stage, latents, pipe.vae_factor), stage_cfg.batch_size, rank, world,
                   cfg.run.seed, cfg.data.loader_workers, stage, consumed)
    log = RunLog(run_root, stage) if rank == 0 else None
    amp = DTYPES[cfg.optim.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # fp16 gradients need loss scaling
    generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + rank * 104729 + step)
    began = time.monotonic()
    while step < stage_cfg.steps:
        maybe_fail(cfg, step, rank, world, run_root)
        started = time.perf_counter()
        total_loss, samples = 0.0, 0
        for micro in range(stage_cfg.grad_accum):
            batch = next(data)
            x0 = (batch["images"].flatten(0, 1) if stage == 2 else batch["image"]).to(device)
            emb = embed(text, batch["captions"] if stage == 2 else batch["caption"]).to(device)
            emb = emb.flatten(0, 1) if stage == 2 else emb
            b = batch["images"].shape[0] if stage == 2 else x0.shape[0]
            per = x0.shape[0] // b  # views per tour (1 in stage 1): one timestep per tour
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=generator)
            t = t.repeat_interleave(per).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            noisy = noise_sched.add_noise(x0, noise, t)
            k, s_ = cfg.model.num_ref_views, cfg.model.num_samples
            epi = pipe.epipolar.context(batch["poses"], k, s_) if stage == 2 else None
            last = micro == stage_cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or ddp is model else ddp.no_sync()  # all-reduce once per step
            autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
            with sync:
                with autocast:
                    out = ddp(noisy, t, emb, epi)
                loss = diffusion_loss(out, x0, noise, t, noise_sched, cfg.optim.prediction_type,
                                      cfg.optim.min_snr_gamma)
                scaler.scale(loss / stage_cfg.grad_accum).backward()
            total_loss += loss.item() / stage_cfg.grad_accum
            samples += b
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, stage_cfg.max_grad_norm))
        scaler.step(optimizer)
        scaler.update()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        step += 1
        metrics = {"loss": total_loss, "lr": lr_sched.get_last_lr()[0], "grad_norm": grad_norm,
                   "samples_per_s": samples * world / (time.perf_counter() - started), "step": step,
                   "time": time.time()}
        stop = out_of_time(began, stage_cfg.time_limit_s, world, device)
        log_and_checkpoint(cfg, log, metrics, step if stop else stage_cfg.steps,
                           partial(save_state, params=params, optimizer=optimizer, lr_sched=lr_sched,
                                   ema=ema, step=step, consumed=data.consumed, rank=rank))
        if rank == 0 and cfg.run.sample_every and step % cfg.run.sample_every == 0 and step < stage_cfg.steps:
            _sample(pipe, cfg, batch, stage, run_root, step)
        if stop:
            break
    if rank == 0:
        finish(pipe, cfg, stage, stage_cfg, params, ema, config["export"], run_root, step)


def _sample(pipe, cfg: TrainConfig, batch: dict, stage: int, run_root: str, step: int) -> None:
    """Sample panoramas from the current weights beside the checkpoints."""
    captions = [c or "a room" for c in (batch["captions"][0] if stage == 2 else batch["caption"][:2])]
    pipe.unet.eval()
    try:
        uri = storage.join(run_root, "samples", f"stage{stage}-step{step:06d}.png")
        sample_tour(pipe, cfg, stage, captions, uri)
    finally:
        pipe.unet.train()


def finish(pipe, cfg: TrainConfig, stage: int, stage_cfg, params, ema, export: str, run_root: str, step: int) -> None:
    """Export the stage's model directory (EMA weights when kept, LoRA merged) and a final sample."""
    if ema is not None:
        ema.copy_to(params)
    if stage_cfg.lora_rank:
        merge_lora(pipe.unet)
    pipe.unet.eval()
    pipe.epipolar.eval()
    pipe.epipolar.enabled = True
    pipe.model_name = f"{Path(run_root).name}-stage{stage}@{step}"
    save_model(pipe, export)
    storage.write_bytes(storage.join(export, "training.json"),
                        json.dumps({"stage": stage, "steps": step, "config": cfg.model_dump(mode="json")},
                                   indent=2).encode())
    captions = ["a bedroom with blue walls", "a kitchen with white walls"]
    with contextlib.suppress(Exception):  # a sample is a courtesy; the export is what matters
        sample_tour(pipe, cfg, stage, captions, storage.join(run_root, "samples", f"stage{stage}-final.png"))
    print(f"stage{stage}: exported {export}", flush=True)
