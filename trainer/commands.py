"""The trainer's sub-command: `diffpano train`."""

from __future__ import annotations

import re

import typer

from diffpano.cli import Commands

STAGES = {"vae": [0], "stage1": [1], "stage2": [2], "all": [0, 1, 2]}


def train(
    stages: str = typer.Argument(..., help="vae, stage1, stage2 or all (the VAE stage when vae.steps > 0)."),
    config: str = typer.Option(..., "--config", help="YAML training config (see trainer/configs/)."),
    name: str = typer.Option(..., "--name", help="Run name; running the same name again resumes it."),
    storage_root: str = typer.Option("outputs/runs", "--storage", help="Folder or s3:// prefix for runs."),
    overrides: list[str] | None = typer.Option(None, "--set", help="Override a config key: key.path=value."),
    local: str | None = typer.Option(None, "--local", help="Train in this process on DEVICE (cpu, cuda) without "
                                     "Ray: one worker, caches encoded here, no resume."),
) -> None:
    """Train on Ray Train (stage 1: Pano-SD; stage 2: EA modules); the model lands in STORAGE/NAME/model."""
    from trainer.config import load_config
    from trainer.run import StageStopped, run_paths
    from trainer.run import train as run_training

    chosen = STAGES.get(stages)
    if chosen is None:
        raise typer.BadParameter(f"STAGES: expected vae, stage1, stage2 or all, got {stages!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise typer.BadParameter(f"--name: letters, digits, '.', '_' and '-' only, got {name!r}")
    if local is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", local):
        raise typer.BadParameter(f"--local: a device, cpu or cuda[:N], got {local!r}")
    try:
        cfg = load_config(config, overrides)
        if stages == "all" and not cfg.vae.steps:
            chosen = [1, 2]
        results = run_training(cfg, chosen, name, storage_root, local)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    except StageStopped as err:
        typer.echo(f"train stopped: {err}; run the same command again to resume from the last checkpoint", err=True)
        raise typer.Exit(3) from None
    for r in results:
        loss = "—" if r.loss is None else f"{r.loss:.4f}"
        label = "vae" if r.stage == 0 else f"stage{r.stage}"
        typer.echo(f"{label}: {r.steps} steps, final loss {loss}, {r.seconds:.1f}s -> {r.export}")
    # A VAE-only run exports vae-model; every other run ends in the run's model folder.
    typer.echo(f"model: {results[-1].export if chosen == [0] else run_paths(storage_root, name)['model']}")


def register(commands: Commands) -> None:
    """Add `train`."""
    commands.app.command()(train)
