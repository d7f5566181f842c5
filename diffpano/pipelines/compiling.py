"""torch.compile for the denoiser, with an eager fallback: the training step's model and the pipeline's UNet.

Modes are torch.compile's (`default`, `reduce-overhead`, `max-autotune`), plus `off`. Shapes are compiled static
(dynamic=False): each feature-map size and batch gets its own graph, and on CUDA `reduce-overhead` records each as a
CUDA graph (timesteps are tensor inputs, so one graph serves every step count). Off CUDA, `reduce-overhead` and
`max-autotune` fall back to what they can do there (no CUDA graphs). When compiling fails (no C++ compiler, an
unsupported operator), the call warns once and runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator
from torch import nn

log = logging.getLogger(__name__)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# for pydantic configs: YAML 1.1 reads a bare `off` as false, which means "off" here too
CompileMode = Annotated[Literal[COMPILE_MODES], BeforeValidator(lambda v: "off" if v is False else v)]


class EagerFallback:
    """A compiled function that runs its eager original, with one warning, once compiling it has failed."""

    def __init__(self, eager: Callable, mode: str, what: str) -> None:
        self.eager, self.what, self.mode = eager, what, mode
        self.compiled: Callable | None = torch.compile(eager, mode=mode, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled call, or the eager one after a compile failure."""
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:  # compile errors; model errors re-raise eagerly
                log.warning("%s: torch.compile (mode %s) failed, running eagerly: %s", self.what, self.mode,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
                self.compiled = None
        return self.eager(*args, **kwargs)


def check_mode(mode: str) -> str:
    """ValueError naming the rule when mode is not a compile mode."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile: unknown mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    return mode


def compile_module(module: nn.Module, mode: str, what: str | None = None) -> nn.Module:
    """Compile module.forward in place (mode `off`: leave it eager); the module, weights and state_dict unchanged."""
    check_mode(mode)
    uncompile_module(module)
    if mode != "off":
        module.forward = EagerFallback(module.forward, mode, what or type(module).__name__)
    return module


def uncompile_module(module: nn.Module) -> nn.Module:
    """Undo compile_module."""
    if isinstance(module.__dict__.get("forward"), EagerFallback):
        del module.forward
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether compile_module compiled module (and compiling has not fallen back to eager)."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, EagerFallback) and forward.compiled is not None


def compile_pipeline(pipe, mode: str):
    """Compile a pipeline's UNet for sampling (the EA modules run inside its attention); returns the pipeline."""
    compile_module(pipe.unet, mode, "UNet")
    return pipe


def mark_step() -> None:
    """Tell CUDA graphs a new step begins, so outputs of the last one may be overwritten (harmless without them)."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()
