"""Stage-1 LoRA (Pano-SD) on the UNet's attention projections through peft, and the adapter as a shareable file.

The adapter file is diffusers' own LoRA format (`DIR/pytorch_lora_weights.safetensors`, keys `unet.*`, the peft
config as metadata): `StableDiffusionPipeline.from_pretrained(BASE).load_lora_weights(DIR)` loads it, and so does
`load_lora` on a DiffPano pipeline built from the same base.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections import OrderedDict
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from diffpano import specs
from diffpano.io import storage

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# LoRA on the value and output projections learns the spherical structure; on query/key it mostly keeps perspective
# knowledge (UniPano, ICCV 2025). Runs with other targets still load: the file's own peft config names them.
DEFAULT_LORA_TARGETS = ("to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER = "default"  # the name add_lora's adapter gets (peft's default)
LORA_NAME = re.compile(specs.LORA_NAME)
LORA_SUFFIXES = (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")


def add_lora(unet: UNet2DConditionModel, rank: int = 8, alpha: float | None = None,
             targets: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS) -> list[nn.Parameter]:
    """Freeze the UNet, add LoRA adapters to the named attention projections, return the trainable LoRA parameters."""
    if not 1 <= rank <= 512:
        raise ValueError(f"lora_rank: must be in [1, 512], got {rank}")
    check_lora_targets(targets)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets)))
    return [p for p in unet.parameters() if p.requires_grad]


def check_lora_targets(targets: tuple[str, ...] | list[str]) -> None:
    """ValueError naming lora_targets unless it is a non-empty list of distinct attention projections."""
    if not targets or len(set(targets)) != len(targets) or not set(targets) <= set(ATTENTION_PROJECTIONS):
        raise ValueError(f"lora_targets: expected distinct names from {', '.join(ATTENTION_PROJECTIONS)}, "
                         f"got {list(targets)}")


def merge_lora(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Fold the LoRA weights into the base projections and drop the adapters, so the UNet saves as a plain one."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def save_lora(unet: UNet2DConditionModel, uri: str) -> str:
    """Write the UNet's (unmerged) LoRA adapter in diffusers' format to the directory uri (local or s3://)."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    metadata = unet.peft_config[ADAPTER].to_dict()  # keeps lora_alpha, so the scale survives the round trip
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                                  weight_name=LORA_FILE)
        storage.copy_tree(tmp, uri)
    return uri


def load_lora(pipe, uri: str, scale: float = 1.0) -> None:
    """Fuse the diffusers-format LoRA in directory uri (local or s3://) into pipe.unet, its delta times scale."""
    add_adapter(pipe.unet, uri, "loaded")
    pipe.unet.fuse_lora(lora_scale=scale)
    pipe.unet.unload_lora()


def add_adapter(unet: UNet2DConditionModel, uri: str, name: str) -> None:
    """Add the diffusers-format LoRA in directory uri (local or s3://) to the UNet as the peft adapter `name`, unfused;
    ValueError naming lora when it is missing or does not fit the UNet."""
    with tempfile.TemporaryDirectory() as tmp:
        state_dict, _, metadata = StableDiffusionPipeline.lora_state_dict(
            _local_lora_dir(uri, tmp), weight_name=LORA_FILE, local_files_only=True, return_lora_metadata=True)
    _check_keys(unet, state_dict, uri)
    try:
        unet.load_lora_adapter(state_dict, prefix="unet", metadata=metadata or None, adapter_name=name)
    except (RuntimeError, ValueError) as err:  # e.g. shapes of another base model
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"lora: {uri} does not fit this model's UNet: {' '.join(lines[:2])}") from None


class LoraSet:
    """The LoRAs named under one root (ROOT/NAME/pytorch_lora_weights.safetensors) as adapters of one pipeline's UNet:
    loaded on first use, switched per pipeline call without fusing, the least recently used dropped beyond
    `capacity`. Names only: a name is never a path."""

    def __init__(self, pipe, root: str | None, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"max_loras: must be at least 1, got {capacity}")
        self.pipe, self.root, self.capacity = pipe, root, capacity
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first

    def names(self) -> list[str]:
        """The LoRAs loaded now, least recently used first."""
        return list(self.loaded)

    def uri(self, name: str) -> str:
        """Where the LoRA `name` lives; ValueError naming lora without a root or for a name that is a path."""
        if self.root is None:
            raise ValueError(f"lora: {name!r} asked for, but no LoRA root is set to find it in")
        if not LORA_NAME.fullmatch(name):
            raise ValueError(f"lora: {name!r} is not a LoRA name (letters, digits, '.', '-', '_'; no paths)")
        return storage.join(self.root, name)

    def load(self, name: str) -> None:
        """Make the LoRA an adapter of the UNet (a no-op when it is), dropping the least recently used beyond
        capacity."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        add_adapter(self.pipe.unet, self.uri(name), _adapter(name))
        self.loaded[name] = None
        while len(self.loaded) > self.capacity:
            self.drop(next(iter(self.loaded)))

    def drop(self, name: str) -> None:
        """Remove the LoRA's adapter from the UNet (a no-op when it is not loaded)."""
        if self.loaded.pop(name, "absent") is None:
            self.pipe.unet.delete_adapters([_adapter(name)])

    def use(self, name: str | None) -> None:
        """Run the next pipeline calls with this LoRA alone (loading it if needed), or with none."""
        if name is not None:
            self.load(name)
            self.pipe.unet.enable_lora()
            self.pipe.unet.set_adapters([_adapter(name)])
        elif self.loaded:
            self.pipe.unet.disable_lora()


def _adapter(name: str) -> str:
    """The peft adapter name of a LoRA: a digest of its name (peft names may not hold dots; distinct names stay
    distinct)."""
    return "lora_" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _local_lora_dir(uri: str, tmp: str) -> str:
    """A local directory holding uri's LoRA file (an s3:// one is copied into tmp); ValueError when it has none."""
    src = storage.join(uri, LORA_FILE)
    if not storage.exists(src):
        raise ValueError(f"lora: no {LORA_FILE} in {uri} (write one with a stage-1 LoRA run: RUN/lora)")
    if not storage.is_remote(uri):
        return storage.resolve(uri)[1]
    (Path(tmp) / LORA_FILE).write_bytes(storage.read_bytes(src))
    return tmp


def _check_keys(unet: nn.Module, state_dict: dict, uri: str) -> None:
    """ValueError unless every key is a UNet LoRA key naming a module this UNet has."""
    modules = dict(unet.named_modules())
    wrong = [k for k in state_dict if not k.startswith("unet.") or not k.endswith(LORA_SUFFIXES)
             or _module_of(k) not in modules]
    if wrong or not state_dict:
        raise ValueError(f"lora: the keys of {uri} do not match this model's UNet "
                         f"({len(wrong)} of {len(state_dict)} unknown, e.g. {wrong[:2]})")


def _module_of(key: str) -> str:
    """The UNet module a LoRA key adapts ('unet.a.b.lora.down.weight' -> 'a.b')."""
    name = key.removeprefix("unet.")
    return name[: -len(next(s for s in LORA_SUFFIXES if name.endswith(s)))]
