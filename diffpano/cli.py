"""The `diffpano` command: its sub-commands come from every installed layer through the `diffpano.commands`
entry-point group (pyproject.toml), so no layer names one above it; plus the option checks they share."""

from __future__ import annotations

import logging
import math
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

import typer

from diffpano.compiling import COMPILE_MODES
from diffpano.schedulers import SCHEDULER_NAMES

GROUP = "diffpano.commands"
HELP = "DiffPano: text to consistent 360° panorama tours."
GROUPS = {  # sub-command groups several layers add to
    "dataset": "Build and import training datasets (docs/datasets.md).",
    "manifest": "Maintain Parquet manifests (docs/datasets.md, docs/tours.md).",
}


class Commands:
    """The command tree a layer's `register(commands)` adds to: the root app and the shared groups."""

    def __init__(self) -> None:
        self.app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
        self.groups: dict[str, typer.Typer] = {}

    def group(self, name: str) -> typer.Typer:
        """The sub-command group `name` (one of GROUPS), added to the root on first use."""
        if name not in self.groups:
            self.groups[name] = typer.Typer(no_args_is_help=True, help=GROUPS[name])
            self.app.add_typer(self.groups[name], name=name)
        return self.groups[name]


def build_app() -> typer.Typer:
    """The whole command: every registered layer's sub-commands, in the order of their entry-point names."""
    commands = Commands()
    found = sorted(entry_points(group=GROUP), key=lambda e: e.name)
    if not found:
        raise RuntimeError(f"no {GROUP} entry points: install the package (pip install -e .) to get its commands")
    for ep in found:
        ep.load()(commands)
    return commands.app


def finite(value: float | None) -> float | None:
    """A float option's value; NaN and ±inf are refused (click's ranges let them through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def finite_in(low: float | None = None, high: float | None = None):
    """A callback for a float option: finite first (so NaN is not called out of range), then within [low, high]."""

    def check(value: float | None) -> float | None:
        finite(value)
        if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
            bounds = f"in [{low}, {high}]" if low is not None and high is not None else (
                f">= {low}" if low is not None else f"<= {high}")
            raise typer.BadParameter(f"must be {bounds}, got {value}")
        return value

    return check


def choice_option(flag: str, choices: tuple[str, ...], help_text: str):
    """An optional typer option whose value must be one of `choices` (the error lists them)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return typer.Option(None, flag, callback=check, help=help_text)


def scheduler_option(default_help: str = "the model's own"):
    """The --scheduler option: a sampler by name, checked against the library's list."""
    return choice_option("--scheduler", SCHEDULER_NAMES,
                         f"Sampler: {', '.join(SCHEDULER_NAMES)} (default: {default_help}).")


def compile_option(default_help: str = "off"):
    """The --compile option: a torch.compile mode for the UNet (docs/compiling.md)."""
    return choice_option("--compile", COMPILE_MODES,
                         f"torch.compile the UNet: {', '.join(COMPILE_MODES)} (default: {default_help}).")


def parse_size(size: str | None, flag: str = "--size") -> tuple[int | None, int | None]:
    """(height, width) of 'HxW', or (None, None) for the model's default."""
    if not size:
        return None, None
    try:
        h, w = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"{flag}: expected HxW such as 128x256, got {size!r}") from None
    return h, w


def command_name() -> str:
    """How the user can run this command again: `diffpano` when that is on the PATH, else the path they used
    (e.g. .venv/bin/diffpano after `make run`, whose virtual environment is not activated)."""
    used = Path(sys.argv[0])
    found = shutil.which("diffpano")
    if used.name != "diffpano" or (found and Path(found).resolve() == used.resolve()):
        return "diffpano"
    return str(used)


def main() -> None:
    """Entry point of the `diffpano` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    build_app()()


if __name__ == "__main__":
    main()
