"""Serve's sub-command: `diffpano serve`."""

from __future__ import annotations

import signal
import time

import typer

from diffpano.cli import Commands, compile_option, scheduler_option


def serve_command(
    config: str | None = typer.Option(None, "--config", help="Serve config YAML (default: the packaged one)."),
    host: str | None = typer.Option(None, "--host", help="Address to listen on (config default 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", min=1, max=65535),
    model: str | None = typer.Option(None, "--model", help="Model directory or s3:// URI (default: bundled)."),
    output_root: str | None = typer.Option(None, "--output-root", help="Where output=store writes (docs/tours.md)."),
    scheduler: str | None = scheduler_option("the model's own; a request's `scheduler` wins"),
    compile: str | None = compile_option("the config's `compile`"),
) -> None:
    """Serve the HTTP API (docs/http-api.md) and the 360° viewer on Ray Serve until interrupted."""
    from ray import serve

    from serve.run import start

    try:
        url = start(config, host, port, {"model": model, "output_root": output_root,
                                         "default_scheduler": scheduler,
                                         "compile": compile})
    except (ValueError, OSError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"DiffPano API at {url}/v1/tours and {url}/v1/panoramas; viewer at {url}/viewer; docs at {url}/docs")
    # SIGTERM is how services are stopped: shut down cleanly instead of Ray's fatal-signal stack dump
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("shutting down")
        serve.shutdown()


def _interrupt(signum: int, frame) -> None:
    """A SIGTERM handled as Ctrl-C."""
    raise KeyboardInterrupt


def register(commands: Commands) -> None:
    """Add `serve`."""
    commands.app.command("serve")(serve_command)
