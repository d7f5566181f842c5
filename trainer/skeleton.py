"""The one training loop every stage runs (the VAE, stage 1, stage 2), on a Ray Train worker or in a local session.

The skeleton owns what every stage shares: seeding, the model to start from, the optimiser, LR schedule, loss
scaling and EMA, resuming from the latest checkpoint, the endless sharded batches, gradient accumulation, logging,
checkpoint + report, the time limit, fault injection, and calling the export on rank 0. A stage (a `Stage` subclass)
brings only what differs: which parameters train, the loss of a batch, and the sample/export at the end.

    run(config, MyStage)  # train_loop_per_worker
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from diffpano.data.loaders import collate_clips
from diffpano.io import storage
from diffpano.pipelines.compiling import compile_module, mark_step
from diffpano.pipelines.loading import load_model
from trainer import session
from trainer.config import LoopConfig, TrainConfig

STATE_FILE = "state.pt"
STEP_RANGE = "diffpano.train_step"  # the profiler range of one optimiser step (tests check it never syncs)
DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Worker:
    """This worker's part of a stage: the config, the loop config (trainer.run.loop_config), rank, device, model."""

    cfg: TrainConfig
    config: dict
    rank: int
    world: int
    device: torch.device
    pipe: Any  # the MultiViewPanoPipeline the stage starts from, in fp32 on `device`


class Loss(NamedTuple):
    """The loss of one (micro-)batch, how many samples it saw, and extra metrics to log (averaged over a step)."""

    value: torch.Tensor
    samples: int
    logs: dict[str, float] = {}


class Stage:
    """What differs between stages. A subclass sets the attributes below in __init__ and implements loss and export."""

    number: int  # 0 (the VAE), 1 or 2: logs/stageN, checkpoints, and the collate of its batches (clips in 2)
    settings: LoopConfig  # steps, batch size, optimiser, clipping, EMA, time limit
    params: list[nn.Parameter]  # what trains; everything else is frozen
    model: nn.Module  # what DDP wraps; loss() gets it wrapped
    dataset: torch.utils.data.Dataset
    fp16: bool = False  # the forward autocasts to fp16, so gradients need loss scaling

    def __init__(self, w: Worker) -> None:
        self.w = w

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> Loss:
        """The loss of one batch (its backward is the skeleton's)."""
        raise NotImplementedError

    def sample(self, batch: dict, step: int) -> None:
        """Rank 0, every run.sample_every steps: a sample from the current weights (none by default)."""

    def export(self, step: int) -> None:
        """Rank 0, after the last step, with the trained (EMA) weights in place: write the stage's model."""
        raise NotImplementedError


def run(config: dict, stage_type: Callable[[Worker], Stage]) -> None:
    """train_loop_per_worker of a stage: build it, resume from the latest checkpoint, train, export on rank 0."""
    w = setup(config)
    stage = stage_type(w)
    prepare_model(stage.model, w.cfg)
    ddp = session.prepare(stage.model)
    opt = Optimiser(stage, w.device)
    step, consumed = 0, 0
    with session.latest_checkpoint() as d:
        if d is not None:
            step, consumed = opt.load(d, w.rank)
    if opt.ema is not None:
        opt.ema.to(w.device)
    data = Batches(stage.dataset, stage.settings.batch_size, w.rank, w.world, w.cfg.run.seed,
                   w.cfg.data.loader_workers, stage.number, consumed, pin=w.device.type == "cuda")
    step = train_steps(w, stage, ddp, opt, data, step)
    if w.rank == 0:
        opt.use_ema_weights()
        stage.export(step)


def train_steps(w: Worker, stage: Stage, ddp: nn.Module, opt: Optimiser, data: Batches, step: int) -> int:
    """Optimiser steps until the stage's steps or its time limit; returns the steps done.

    Nothing in a step reads a value back from the device: losses and the gradient norm stay tensors until a step
    that logs or checkpoints, and samples/s is measured over the steps since the last log.
    """
    s, cfg = stage.settings, w.cfg
    log = RunLog(w.config["run_root"], stage.number) if w.rank == 0 else None
    generator = torch.Generator(w.device).manual_seed(cfg.run.seed * 7919 + w.rank * 104729 + step)
    began = time.monotonic()
    rate = Rate()
    while step < s.steps:
        maybe_fail(w, step)
        with torch.profiler.record_function(STEP_RANGE):
            logs, samples, batch = accumulate(stage, ddp, data, opt.scaler, generator)
            grad_norm = opt.step()
        step += 1
        rate.add(samples * w.world)
        metrics = {**logs, "lr": opt.lr(), "grad_norm": grad_norm, "step": step}
        stop = out_of_time(began, s.time_limit_s, w.world, w.device, step % cfg.run.log_every == 0)
        log_and_checkpoint(cfg, log, metrics, step if stop else s.steps,
                           partial(opt.save, step=step, consumed=data.consumed, rank=w.rank), rate)
        if w.rank == 0 and cfg.run.sample_every and step % cfg.run.sample_every == 0 and step < s.steps:
            stage.sample(batch, step)
        if stop:
            break
    return step


class Rate:
    """Samples per second between the steps that read it."""

    def __init__(self) -> None:
        self.samples, self.since = 0, time.perf_counter()

    def add(self, samples: int) -> None:
        """Count a step's samples."""
        self.samples += samples

    def read(self) -> float:
        """Samples/s since the last read (the caller has synchronised with the device)."""
        now = time.perf_counter()
        value = self.samples / max(now - self.since, 1e-9)
        self.samples, self.since = 0, now
        return value


def to_device(x: torch.Tensor, w: Worker) -> torch.Tensor:
    """A batch tensor on the worker's device (from pinned memory without waiting, on CUDA), in its memory format."""
    x = x.to(w.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if w.cfg.optim.channels_last and x.ndim == 4 else x


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Channels-last weights and torch.compile, as the config asks (before DDP wraps the model)."""
    if cfg.optim.channels_last:
        model.to(memory_format=torch.channels_last)
    compile_module(model, cfg.optim.compile)


def setup(config: dict) -> Worker:
    """Validate the config, seed this worker, allow TF32 and load the model the stage starts from."""
    cfg = TrainConfig.model_validate(config["cfg"])
    rank, world = session.rank_and_world()
    device = session.device()
    seed_all(cfg.run.seed * 1000 + rank)
    if device.type == "cuda" and cfg.optim.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pipe = load_model(config["init_model"], device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return Worker(cfg, config, rank, world, device, pipe)


def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` on the device, or nothing when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def accumulate(stage: Stage, ddp: nn.Module, data: Batches, scaler: torch.amp.GradScaler,
               generator: torch.Generator) -> tuple[dict[str, torch.Tensor | float], int, dict]:
    """Forward and backward of settings.grad_accum micro-batches: (mean loss and logs, samples, the last batch)."""
    n = stage.settings.grad_accum
    logs: dict[str, torch.Tensor | float] = {}
    samples = 0
    for micro in range(n):
        batch = next(data)
        last = micro == n - 1
        sync = contextlib.nullcontext() if last or ddp is stage.model else ddp.no_sync()  # all-reduce once a step
        mark_step()
        with sync:
            out = stage.loss(ddp, batch, generator)
            scaler.scale(out.value / n).backward()
        for key, value in {"loss": out.value.detach(), **out.logs}.items():
            logs[key] = logs.get(key, 0.0) + value / n
        samples += out.samples
    return logs, samples, batch


class Optimiser:
    """AdamW, its warm-up LR schedule, fp16 loss scaling and the EMA of a stage's parameters; saved and restored."""

    def __init__(self, stage: Stage, device: torch.device) -> None:
        s = stage.settings
        self.params, self.max_norm = stage.params, s.max_grad_norm
        # one fused kernel for the whole update; it also reads fp16 loss scaling's inf check on the device
        self.optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay, fused=True)
        self.lr_sched = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=s.warmup_steps)
        self.ema = EMAModel(self.params, decay=s.ema.decay, foreach=True) if s.ema.enabled else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=stage.fp16)

    def step(self) -> torch.Tensor:
        """Unscale, clip, step the optimiser, LR schedule and EMA; returns the gradient norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return grad_norm

    def lr(self) -> float:
        """The current learning rate."""
        return self.lr_sched.get_last_lr()[0]

    def use_ema_weights(self) -> None:
        """Copy the EMA weights into the parameters (for the export), when an EMA is kept."""
        if self.ema is not None:
            self.ema.copy_to(self.params)

    def save(self, directory: Path, step: int, consumed: int, rank: int) -> None:
        """Trainable weights, optimiser, LR schedule, EMA, step, data position (rank 0), RNG state (every rank)."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save(rng, directory / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save({
                "params": [p.detach().cpu() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_sched.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "step": step, "consumed": consumed,
            }, directory / STATE_FILE)

    def load(self, directory: Path, rank: int) -> tuple[int, int]:
        """Restore what save wrote; returns (step, consumed batches)."""
        state = torch.load(directory / STATE_FILE, weights_only=False)
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved.to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        rng_file = directory / f"rng_rank{rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        return int(state["step"]), int(state["consumed"])


class Batches:
    """Endless batches of this worker's shard, epoch after epoch, starting at any number of consumed batches."""

    def __init__(self, dataset, batch_size: int, rank: int, world: int, seed: int, workers: int, stage: int,
                 consumed: int, pin: bool = False) -> None:
        self.dataset, self.batch_size, self.workers, self.stage, self.pin = dataset, batch_size, workers, stage, pin
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
                                   num_workers=self.workers, collate_fn=collate_clips if self.stage == 2 else None,
                                   pin_memory=self.pin))

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
        # not print(): Ray Train patches it to log too, and the worker's line then reaches the driver twice
        sys.stdout.write(f"stage{self.stage} step {step}/{total} "
                         + " ".join(f"{k} {v:.4g}" for k, v in shown.items()) + "\n")
        sys.stdout.flush()

    def sync(self) -> None:
        """Copy the logs to the run's storage."""
        self.writer.flush()
        storage.copy_tree(str(self.local), self.remote)


def log_and_checkpoint(cfg: TrainConfig, log: RunLog | None, metrics: dict, total: int,
                       save: Callable[[Path], None], rate: Rate) -> None:
    """Log a step on rank 0; every run.checkpoint_every steps (and at the end) report a checkpoint save() wrote.

    Only these steps read the metrics back from the device.
    """
    step = metrics["step"]
    logs, checkpoint = step % cfg.run.log_every == 0 or step == total, step % cfg.run.checkpoint_every == 0
    if not (logs or checkpoint or step == total):
        return
    metrics = {k: float(v) for k, v in metrics.items()} | {"step": step, "time": time.time(),
                                                            "samples_per_s": rate.read()}
    if log is not None and logs:
        log.step(step, total, {k: v for k, v in metrics.items() if k != "step"})
    if checkpoint or step == total:
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            if log is not None:
                log.sync()
            session.report(metrics, Path(tmp))


def out_of_time(began: float, limit: float | None, world: int, device: torch.device, agree: bool) -> bool:
    """True once the stage has trained `limit` seconds in this attempt; rank 0's clock decides for every worker.

    A single worker reads its clock every step. Several workers agree only on steps where `agree` (those that log),
    because agreeing is a broadcast that waits for the device.
    """
    if limit is None:
        return False
    late = time.monotonic() - began > limit
    if world == 1:
        return late
    if not agree:
        return False
    flag = torch.tensor([float(late)], device=device)
    torch.distributed.broadcast(flag, src=0)  # every worker must leave at the same step, or an all-reduce hangs
    return bool(flag.item())


def maybe_fail(w: Worker, step: int) -> None:
    """Fault injection for tests: once `run.fail_at_step` steps are done (a checkpoint of that step already reported),
    the last worker's process dies by SIGKILL, as an out-of-memory kill or a lost node ends one: no exception, no
    cleanup.

    RUN_ROOT/injected-failure-STEP records the process id and the time of death ({"pid", "time"}); while it exists
    the failure is not injected again, so the restarted worker group goes on. In a local session (`--local`) the
    process that dies is the command itself, since nothing is there to restart it.
    """
    if w.cfg.run.fail_at_step != step or w.rank != w.world - 1:
        return
    marker = storage.join(w.config["run_root"], f"injected-failure-{step}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, json.dumps({"pid": os.getpid(), "time": time.time()}).encode())
    os.kill(os.getpid(), signal.SIGKILL)
