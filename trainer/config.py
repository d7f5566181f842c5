"""Training configuration: YAML files validated on load (unknown keys and bad values rejected, naming the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from diffpano.defaults import MAX_REF_VIEWS, MAX_SAMPLES, MAX_STEPS, MAX_VIEWS
from diffpano.geometry.spherical import check_panorama_size
from diffpano.models.lora import DEFAULT_LORA_TARGETS, check_lora_targets
from diffpano.pipelines.compiling import CompileMode
from diffpano.pipelines.factory import ARCHITECTURES
from diffpano.specs import Strict  # config sections: unknown keys, NaN and Infinity are errors naming the key

Arch = Literal[tuple(ARCHITECTURES)]


class ModelConfig(Strict):
    """Where the model starts: a model directory (docs/model-layout.md), or a fresh architecture from scratch."""

    base: str | None = None  # model directory or s3:// URI; None builds `arch` from scratch
    arch: Arch = "tiny"
    text_encoder: Literal["tiny-bert", "minilm"] = "tiny-bert"  # for arch builds only
    num_ref_views: int = Field(2, ge=1, le=MAX_REF_VIEWS)
    num_samples: int = Field(8, ge=1, le=MAX_SAMPLES)


class DataConfig(Strict):
    """The dataset (docs/datasets.md) and how samples are drawn from it."""

    dataset: str
    size: tuple[int, int] = (32, 64)
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)
    yaw_augment: bool = True
    flip_prob: float = Field(0.0, ge=0.0, le=1.0)
    loader_workers: int = Field(0, ge=0, le=64)
    cache_actors: int = Field(1, ge=0, le=256)  # 0: encode the caches in this process, without Ray

    @field_validator("size")
    @classmethod
    def _panorama(cls, v: tuple[int, int]) -> tuple[int, int]:
        """W = 2H, H >= 8."""
        return check_size(v)


def check_size(v: tuple[int, int] | None) -> tuple[int, int] | None:
    """A panorama size [H, 2H] with H >= 8 (None passes)."""
    if v is not None:
        check_panorama_size(*v, field="size")
        if v[0] < 8:
            raise ValueError(f"size: the height must be at least 8, got {list(v)}")
    return v


class EmaConfig(Strict):
    """Exponential moving average of the trainable weights."""

    enabled: bool = False
    decay: float = Field(0.999, gt=0.0, lt=1.0)


class LoopConfig(Strict):
    """What the training loop of every stage reads: length, batch, optimiser, clipping, EMA, time limit."""

    steps: int = Field(100, ge=0)
    batch_size: int = Field(4, ge=1)  # per worker; stage 2: tours (clips) per worker
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    time_limit_s: float | None = Field(None, gt=0.0)  # stop (and export) after this many seconds of training
    grad_accum: int = Field(1, ge=1, le=1024)
    max_grad_norm: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    ema: EmaConfig = EmaConfig()


class StageConfig(LoopConfig):
    """Stage 1 or 2."""

    lora_rank: int = Field(0, ge=0, le=1024)  # 0: train the whole UNet (stage 1) / keep it frozen (stage 2)
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # attention projections LoRA adapts (diffpano.models.lora)
    views: int = Field(4, ge=2, le=MAX_VIEWS)  # stage 2: views per clip window
    train_unet: bool = False  # stage 2: train the whole UNet with the EA modules (one-stage training, an ablation)
    size: tuple[int, int] | None = None  # [H, W] of this stage; None: data.size

    @field_validator("size")
    @classmethod
    def _panorama(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        """W = 2H, H >= 8."""
        return check_size(v)

    @field_validator("lora_targets")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        """Distinct attention projections."""
        check_lora_targets(v)
        return v


class VaeStageConfig(LoopConfig):
    """Stage 0: train the VAE of a fresh latent architecture on the dataset's panoramas (reconstruction + KL), or
    fine-tune the decoder of a base model's VAE."""

    steps: int = Field(0, ge=0)  # 0: no VAE stage (a base model's VAE, or a pixel-space model)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)  # AdamW's default
    kl_weight: float = Field(1e-6, ge=0.0)
    strip_rows: int | None = Field(None, ge=8)  # train on random full-width strips of this many rows (cheaper)
    # Fine-tune only the decoder of model.base's VAE: the encoder, its latent space and scaling_factor stay as they
    # are, so the base's UNet stays valid (how Stable Diffusion's ft-MSE VAE was made).
    decoder_only: bool = False


class OptimConfig(Strict):
    """The diffusion objective and numerics."""

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    min_snr_gamma: float | None = Field(None, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    allow_tf32: bool = True
    # torch.compile of the stage's model (diffpano.pipelines.compiling; reduce-overhead: CUDA graphs, static batches)
    compile: CompileMode = "off"
    channels_last: bool = False  # NHWC activations and conv weights (faster convolutions on CUDA tensor cores)


class ScalingSection(Strict):
    """Ray Train workers."""

    num_workers: int = Field(2, ge=0, le=4096)  # 0: in this process without a Ray cluster (debugging, benchmarks)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    accelerator_type: str | None = None  # e.g. A100: workers only on nodes with that GPU (Ray's accelerator_type)


class RunSection(Strict):
    """Checkpoints, fault tolerance, logging, samples."""

    seed: int = 0
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)
    # a stage with no room for all its workers (a node lost, a full cluster) waits this long, then stops, resumable
    capacity_wait_s: float = Field(600.0, gt=0.0, allow_inf_nan=False)
    log_every: int = Field(1, ge=1)
    sample_every: int = Field(0, ge=0)  # 0: only at the end of a stage
    sample_steps: int = Field(10, ge=1, le=MAX_STEPS)
    fail_at_step: int | None = None  # testing: the last worker's process is killed once after this step


class TrainConfig(Strict):
    """A whole two-stage training run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig
    vae: VaeStageConfig = VaeStageConfig()
    stage1: StageConfig = StageConfig()
    stage2: StageConfig = StageConfig(batch_size=1)
    optim: OptimConfig = OptimConfig()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()

    def size(self, stage: int) -> tuple[int, int]:
        """(H, W) the given stage trains at."""
        return tuple((self.stage2 if stage == 2 else self.stage1).size or self.data.size)

    @model_validator(mode="after")
    def _lora_needs_base(self) -> TrainConfig:
        """LoRA in stage 1 adapts a pretrained UNet; training from scratch trains all of it."""
        if self.stage1.lora_rank and self.model.base is None:
            raise ValueError("stage1.lora_rank: LoRA needs a pretrained model.base; use 0 to train from scratch")
        if self.vae.decoder_only and (self.model.base is None or not self.vae.steps):
            raise ValueError("vae.decoder_only: fine-tunes the decoder of a model.base's VAE; set model.base and "
                             "vae.steps > 0")
        if self.vae.steps and not self.vae.decoder_only and (
                self.model.base is not None or "latent" not in self.model.arch):
            raise ValueError("vae.steps: only a fresh latent model.arch (no model.base) has a VAE to train; use 0, "
                             "or vae.decoder_only=true to fine-tune the decoder of model.base's VAE")
        return self


def _set(tree: dict, dotted: str, value: object) -> None:
    """tree[a][b][c] = value for 'a.b.c', creating sections."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ValueError(f"{dotted}: {key} is not a section")
    tree[leaf] = value


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    """'key.path=value' strings as (key, YAML-parsed value)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected key=value, got {item!r}")
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def describe(err: ValidationError) -> str:
    """One line per problem, each naming the dotted key."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config in a YAML file with --set overrides applied, validated; ValueError names every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config: {path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"--config: {path} must hold a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set(tree, key, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ValueError(describe(err)) from None
