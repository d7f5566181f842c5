"""The samplers a user chooses by name, each built from a model's own scheduler config (diffusers `from_config`)."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (class, settings that define the name on top of the model's config)
_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)
SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {cls.__name__: cls for cls, _ in _SCHEDULERS.values()}


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


def fresh_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A new instance of the same scheduler (same class and config), so no sampling state is shared."""
    return type(scheduler).from_config(scheduler.config)


def scheduler_from_class(class_name: str, config: dict[str, Any]) -> SchedulerMixin:
    """The scheduler a model directory names (model_index.json) built from its config; ValueError for others."""
    if class_name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"scheduler: the model names {class_name!r}, which is not supported; use one of {sorted(SCHEDULER_CLASSES)}"
        )
    return SCHEDULER_CLASSES[class_name].from_config(config)
