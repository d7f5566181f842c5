"""Runs the training stages: initial model, caches, a TorchTrainer (or one local worker) per stage, the export."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from diffpano.data.manifest import read_dataset
from diffpano.io import storage
from fanout.cluster import join_ray
from trainer import session
from trainer.cache import build_latent_cache, build_text_cache, has_vae
from trainer.config import TrainConfig
from trainer.diffusion import train_stage
from trainer.vae import train_vae

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's; the driver passes it to its controller


@dataclass
class StageResult:
    """What one stage did."""

    stage: int
    steps: int
    loss: float | None
    seconds: float
    export: str


def run_paths(storage_root: str, name: str) -> dict[str, str]:
    """Where a run keeps its pieces below STORAGE/NAME."""
    root = storage.join(storage.absolute(storage_root), name)
    return {"root": root, "init": storage.join(root, "init-model"), "vae": storage.join(root, "vae-model"),
            "stage1": storage.join(root, "stage1-model"), "model": storage.join(root, "model"),
            "lora": storage.join(root, "lora")}  # a stage-1 LoRA alone, in diffusers' format


def check_dataset(cfg: TrainConfig) -> None:
    """A clear error before any worker starts when the dataset has no manifest rows."""
    if read_dataset(cfg.data.dataset, ["clip_id"]).num_rows == 0:
        raise ValueError(f"data.dataset: no manifest (or no keyframes) at {cfg.data.dataset}; build one with "
                         "`diffpano dataset build` or `diffpano dataset import`")


def initial_model(cfg: TrainConfig, target: str) -> str:
    """The model stage 1 starts from: model.base as given, or a fresh `arch` written once to target."""
    if cfg.model.base:
        return cfg.model.base
    if storage.exists(storage.join(target, "model_index.json")):
        return target
    from diffpano.pipelines.factory import fresh_pipeline
    from diffpano.pipelines.loading import save_model

    pipe = fresh_pipeline(cfg.model.arch, cfg.size(1)[0], cfg.model.text_encoder, cfg.run.seed,
                          num_ref_views=cfg.model.num_ref_views, num_samples=cfg.model.num_samples)
    save_model(pipe, target)
    return target


def loop_config(cfg: TrainConfig, stage: int, paths: dict, init_model: str, caches: tuple) -> dict:
    """What the stage loop (train_vae or train_stage) gets: config, model to start from, caches, export folders."""
    return {"cfg": cfg.model_dump(mode="json"), "stage": stage, "run_root": paths["root"], "init_model": init_model,
            "text_cache": caches[0], "latent_cache": caches[1], "export": export_of(paths, stage),
            "lora": paths["lora"]}


def stage_trainer(cfg: TrainConfig, stage: int, paths: dict, init_model: str, caches: tuple):
    """The TorchTrainer of one stage; RunConfig(name=stageN) under the run root, so re-running resumes it."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker} | ({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})
    start_timeout = float(os.environ.setdefault(START_TIMEOUT_ENV, str(min(60.0, cfg.run.capacity_wait_s))))
    storage_path, storage_filesystem = _ray_storage(paths["root"])
    return TorchTrainer(
        train_vae if stage == 0 else train_stage, train_loop_config=loop_config(cfg, stage, paths, init_model, caches),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources,
                                     accelerator_type=sc.accelerator_type),
        run_config=RunConfig(
            name=f"stage{stage}", storage_path=storage_path, storage_filesystem=storage_filesystem,
            # each start of the worker group that finds no room for it is a controller failure, retried until
            # capacity_wait_s has passed (Ray Train's default retries it for ever)
            failure_config=FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=max(
                1, math.ceil(cfg.run.capacity_wait_s / start_timeout))),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": storage.worker_env()},
            # Ray Train's own INFO lines (each retry decision with its traceback) stay in its log files: a lost node
            # or a stop for want of room is said by the stage's own lines and the command's message
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


class StageStopped(RuntimeError):
    """A stage stopped before its end for want of room (resumable: the same command goes on from its checkpoint)."""


def fit(trainer, cfg: TrainConfig, stage: int) -> dict:
    """The stage's last metrics; StageStopped when its workers found no room for run.capacity_wait_s."""
    from ray.train import ControllerError

    try:
        return trainer.fit().metrics or {}
    except ControllerError as err:
        if type(err.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        sc = cfg.scaling
        need = f"{sc.num_workers} workers of {sc.cpus_per_worker:g} CPU" + (
            f" + {sc.gpus_per_worker:g} GPU" if sc.use_gpu else "")
        raise StageStopped(f"{'vae' if stage == 0 else f'stage{stage}'}: the cluster had no room for {need} for "
                           f"{cfg.run.capacity_wait_s:g}s (run.capacity_wait_s)") from None


def _ray_storage(uri: str) -> tuple[str, object]:
    """(storage_path, storage_filesystem) for Ray Train; S3 gets a configured filesystem, so Ray's own processes
    need no AWS variables of their own (an endpoint set after the cluster started would not reach them)."""
    fs, path = storage.resolve(uri)
    return path, (fs if storage.is_remote(uri) else None)


def export_of(paths: dict, stage: int) -> str:
    """The model directory a stage writes."""
    return {0: paths["vae"], 1: paths["stage1"], 2: paths["model"]}[stage]


def stage_start(cfg: TrainConfig, stage: int, paths: dict) -> str:
    """The model directory a stage starts from: the previous stage's export, model.base, or a fresh arch."""
    done = {k: storage.exists(storage.join(paths[k], "model_index.json")) for k in ("vae", "stage1")}
    if stage == 0:
        return initial_model(cfg, paths["init"])
    if stage == 1:
        return paths["vae"] if done["vae"] else initial_model(cfg, paths["init"])
    if done["stage1"]:
        return paths["stage1"]
    if cfg.model.base:
        return cfg.model.base
    raise ValueError(f"model.base: stage 2 needs a stage-1 model; run stage1 first (none at {paths['stage1']}) "
                     "or set model.base")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its dataset and base model as absolute paths (Ray workers run in other folders)."""
    model = cfg.model.model_copy(update={"base": cfg.model.base and storage.absolute(cfg.model.base)})
    data = cfg.data.model_copy(update={"dataset": storage.absolute(cfg.data.dataset)})
    return cfg.model_copy(update={"model": model, "data": data})


def train(cfg: TrainConfig, stages: list[int], name: str, storage_root: str,
          local_device: str | None = None) -> list[StageResult]:
    """Run the given stages (0: VAE, 1, 2) of a named run; a re-run with the same name resumes where it stopped.

    With local_device ("cpu", "cuda"), each stage runs in this process as one worker, without Ray (no resume)."""
    check_dataset(cfg)
    cfg = absolute_paths(cfg)
    if 0 in stages and cfg.vae.decoder_only and not has_vae(cfg.model.base):
        raise ValueError(f"vae.decoder_only: model.base has no VAE to fine-tune (pixel space): {cfg.model.base}")
    paths = run_paths(storage_root, name)
    if cfg.scaling.num_workers and local_device is None:
        join_ray(log_to_driver=True)  # the workers' progress lines
    actors = 0 if local_device else cfg.data.cache_actors
    gpus = 1.0 if local_device and local_device.startswith("cuda") else 0.0
    results = []
    for stage in stages:
        start = stage_start(cfg, stage, paths)
        caches = (None, None) if stage == 0 else (
            build_text_cache(cfg.data.dataset, start, actors, num_gpus=gpus),
            build_latent_cache(cfg.data.dataset, start, cfg.size(stage), actors, num_gpus=gpus))
        started = time.perf_counter()
        if local_device:
            with session.local(local_device) as local:
                (train_vae if stage == 0 else train_stage)(loop_config(cfg, stage, paths, start, caches))
            metrics = local.reports[-1] if local.reports else {}
        else:
            metrics = fit(stage_trainer(cfg, stage, paths, start, caches), cfg, stage)
        results.append(StageResult(stage, int(metrics.get("step", 0)), metrics.get("loss"),
                                   time.perf_counter() - started, export_of(paths, stage)))
    if stages == [1]:
        storage.copy_tree(paths["stage1"], paths["model"])
    return results
