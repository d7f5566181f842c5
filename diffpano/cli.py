"""The `diffpano` command: its sub-commands come from every installed layer through the `diffpano.commands`
entry-point group (pyproject.toml), so no layer names one above it; plus the option checks they share."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import shutil
import sys
import typing
from importlib.metadata import entry_points
from pathlib import Path

import typer
from pydantic import BaseModel, ValidationError

from diffpano.geometry.spherical import check_panorama_size
from diffpano.pipelines.compiling import COMPILE_MODES
from diffpano.pipelines.schedulers import SCHEDULER_NAMES
from diffpano.specs import error_line

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


def spec_options(spec_cls: type[BaseModel]):
    """Decorate a command taking `spec`: it gets one option per field of spec_cls (help from the field's
    description; a height field and its width as one HxW size option), validated into spec_cls before the command
    runs; a value that breaks a rule is a bad parameter naming the field. A height field marked
    json_schema_extra={"size": True} (and its width, W = 2H when there is none) is one HxW option."""
    fields = spec_cls.model_fields
    sizes = {name.removesuffix("height"): name for name, info in fields.items()  # prefix -> height field
             if (info.json_schema_extra or {}).get("size")}

    def option(name: str, info) -> inspect.Parameter:
        """The typer option of one field."""
        kind = info.annotation
        if typing.get_origin(kind) is typing.Literal:  # typer has no Literal: pydantic checks the choice
            kind = str
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            flag = f"{flag}/--no-{name.replace('_', '-')}"
        bounds = {k: getattr(m, a) for m in info.metadata for k, a in (("min", "ge"), ("max", "le")) if hasattr(m, a)}
        help_text = info.description
        if kind is not int:  # click's float ranges call NaN out of range; pydantic says it is not finite
            help_text += "".join(f" {k.capitalize()} {v}." for k, v in bounds.items())
            bounds = {}
        elif bounds.get("max", 0) >= 2**31:  # a seed: no bound worth printing
            bounds.pop("max")
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                 default=typer.Option(info.default, flag, help=help_text, **bounds))

    def size_option(prefix: str, height: str) -> inspect.Parameter:
        """One HxW option for a height field (and its width, W = 2H by default)."""
        h, what = fields[height].default, fields[height].description.split(" (")[0]
        return inspect.Parameter(f"{prefix}size", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                 default=typer.Option(f"{h}x{2 * h}", f"--{prefix.replace('_', '-')}size",
                                                      help=f"{what}: HxW, W = 2H."))

    def decorate(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "spec"]
        paired = set(sizes.values()) | {f"{k}width" for k in sizes}
        arguments = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
        params = arguments + [size_option(k, v) for k, v in sizes.items()]
        params += [option(n, f) for n, f in fields.items() if n not in paired and n != "source"]
        params += [p for p in own if p not in arguments]

        @functools.wraps(fn)
        def command(**kwargs):
            values = {n: kwargs.pop(n) for n in list(kwargs) if n in fields}
            for prefix, height in sizes.items():
                flag = f"--{prefix.replace('_', '-')}size"
                values[height], width = parse_size(kwargs.pop(f"{prefix}size"), flag)
                if f"{prefix}width" in fields:
                    values[f"{prefix}width"] = width
                    continue
                try:  # a size without a width field of its own: W = 2H is checked here, by the library's check
                    check_panorama_size(values[height], width, field=f"{prefix}size")
                except ValueError as err:
                    raise typer.BadParameter(str(err)) from None
            try:
                spec = spec_cls(**values)
            except ValidationError as err:
                raise typer.BadParameter(error_line(err)) from None
            return fn(spec=spec, **kwargs)

        command.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


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
