"""The training session a stage loop runs in: Ray Train's worker context, or one local worker in this process.

The training loop (trainer.skeleton, running the stages of trainer.diffusion and trainer.vae) reaches Ray Train only
through these functions. Inside `local(device)` it runs as the only worker of a session with no Ray at all (no
checkpoint to resume, reports kept in memory), which is how a machine without Ray trains: one process, one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass
class LocalSession:
    """One worker in this process: rank 0 of 1 on `device`; the metrics of every report, newest last."""

    device: torch.device
    reports: list[dict] = field(default_factory=list)


_local: LocalSession | None = None


@contextlib.contextmanager
def local(device: str | torch.device) -> Iterator[LocalSession]:
    """Run the stage loops called inside as the single worker of a local session on `device`."""
    global _local
    previous, _local = _local, LocalSession(torch.device(device))
    try:
        yield _local
    finally:
        _local = previous


def rank_and_world() -> tuple[int, int]:
    """This worker's rank and the number of workers."""
    if _local is not None:
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def device() -> torch.device:
    """The device this worker trains on."""
    if _local is not None:
        return _local.device
    import ray.train.torch

    return ray.train.torch.get_device()


def prepare(model: nn.Module) -> nn.Module:
    """The model wrapped for data-parallel training (DDP) when there are several workers."""
    if rank_and_world()[1] == 1:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model, move_to_device=False)


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """The folder of the checkpoint to resume from, or None (always None in a local session)."""
    if _local is not None:
        yield None
        return
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


def report(metrics: dict, directory: Path) -> None:
    """Report a step's metrics with the checkpoint written to `directory` (a local session keeps the metrics)."""
    if _local is not None:
        _local.reports.append(dict(metrics))
        return
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
