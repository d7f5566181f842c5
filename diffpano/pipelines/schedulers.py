"""Samplers: the ones a user chooses by name (each built from a model's own scheduler config, diffusers
`from_config`), the class a model directory names, and which classes the pipelines can sample with."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import DummyObject

# name -> (class, settings that define the name on top of the model's config)
_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS, as Stable Diffusion 1.x ships it
    "lms": (LMSDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)

# The classes diffusers' Stable Diffusion pipelines take (KarrasDiffusionSchedulers) less two this pipeline refuses.
_UNSAMPLABLE = {
    "EDMEulerScheduler": "it feeds the UNet EDM noise levels, not the timesteps Stable Diffusion UNets know",
    "DPMSolverSDEScheduler": "its Brownian noise is shared by a whole batch, so a tour would depend on its batch",
}
SAMPLABLE_CLASSES: frozenset[str] = frozenset(k.name for k in KarrasDiffusionSchedulers) - set(_UNSAMPLABLE)


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """A fresh scheduler `name` (one of SCHEDULER_NAMES) built from a base scheduler config; ValueError otherwise."""
    if name not in _SCHEDULERS:
        raise ValueError(f"scheduler: unknown {name!r}; choose from {', '.join(SCHEDULER_NAMES)}")
    cls, settings = _SCHEDULERS[name]
    return cls.from_config(config, **settings)


def scheduler_name(scheduler: SchedulerMixin) -> str | None:
    """The SCHEDULER_NAMES entry a scheduler instance is, or None when it is none of them."""
    for name, (cls, settings) in _SCHEDULERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in settings.items()):
            return name
    return None


def scheduler_label(scheduler: SchedulerMixin) -> str:
    """What a manifest records of the sampler a tour used: its name, else its diffusers class."""
    return scheduler_name(scheduler) or type(scheduler).__name__


def fresh_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A new instance of the same scheduler (same class and config), so no sampling state is shared."""
    return type(scheduler).from_config(scheduler.config)


def _way_out() -> str:
    """The end of every scheduler error: how to pick another sampler."""
    return f"choose a sampler by name with --scheduler (or `scheduler`): {', '.join(SCHEDULER_NAMES)}"


def scheduler_from_class(class_name: str, config: dict[str, Any]) -> SchedulerMixin:
    """The diffusers scheduler class a model directory names, built from its config; ValueError (one line) when
    diffusers has no such class or cannot build it here."""
    cls = getattr(diffusers, class_name, None)
    placeholder = isinstance(cls, DummyObject)  # diffusers' stand-in for a class whose extra package is missing
    if not (inspect.isclass(cls) and (placeholder or issubclass(cls, SchedulerMixin))):
        raise ValueError(f"scheduler: the model names {class_name!r}, which diffusers {diffusers.__version__} does "
                         f"not have; {_way_out()}")
    try:
        return cls.from_config(config)
    except ImportError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(f"scheduler: the model's {class_name} cannot be built here ({reason}); {_way_out()}") from None


def check_samplable(scheduler: SchedulerMixin) -> None:
    """ValueError naming the class and the way out unless the pipelines can sample with this scheduler."""
    name = type(scheduler).__name__
    if name in SAMPLABLE_CLASSES:
        return
    why = _UNSAMPLABLE.get(name, "diffusers' Stable Diffusion pipelines do not take it either")
    raise ValueError(f"scheduler: the model's {name} cannot sample tours ({why}); {_way_out()}")


def takes_eta(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler's step takes DDIM's eta."""
    return "eta" in inspect.signature(scheduler.step).parameters


def unet_calls(scheduler: SchedulerMixin, steps: int) -> int:
    """UNet calls of one denoising run of `steps` steps: more than steps for PNDM's warm-up and second-order
    samplers (Heun, KDPM2), which evaluate the UNet twice per step."""
    probe = fresh_scheduler(scheduler)
    probe.set_timesteps(steps)
    return len(probe.timesteps)
