"""The cluster's sub-command: `diffpano submit` runs train or bulk on a Ray cluster as a Ray job."""

from __future__ import annotations

import typer

from diffpano.cli import Commands


def submit(
    ctx: typer.Context,
    kind: str = typer.Argument(..., help="train or bulk; the arguments after it are that command's."),
    address: str | None = typer.Option(None, "--address", help="Dashboard URL http://HEAD:8265 "
                                       "(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, then 127.0.0.1:8265)."),
    working_dir: str | None = typer.Option(None, "--working-dir", help="Code sent with the job (default: this "
                                           "checkout; none for an installed package: the cluster's image runs it)."),
    no_working_dir: bool = typer.Option(False, "--no-working-dir", help="Send no code: run the image's diffpano."),
    submission_id: str | None = typer.Option(None, "--submission-id", help="Job id (default: diffpano-KIND-<hex>)."),
    aws_credentials: bool = typer.Option(True, "--aws-credentials/--no-aws-credentials", help="Pass this shell's "
                                         "AWS keys (off: the cluster's IAM role / IRSA); endpoint and region always."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's log until it ends."),
) -> None:
    """Run `diffpano train|bulk ...` on a Ray cluster as a Ray job (AWS_* variables passed through, not stored)."""
    from cluster.submit import follow, repository_root
    from cluster.submit import submit as submit_job

    if working_dir and no_working_dir:
        raise typer.BadParameter("--working-dir and --no-working-dir: give one of them")
    code = None if no_working_dir else (working_dir or repository_root())
    try:
        job = submit_job(kind, list(ctx.args), address=address, working_dir=code, submission_id=submission_id,
                         credentials=aws_credentials)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    except (OSError, RuntimeError) as e:  # unreachable dashboard, refused or duplicate job, 401
        typer.echo(f"submission failed: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"submitted {job.job_id} to {job.address}: {job.entrypoint}")
    if not wait:
        typer.echo(f"follow: ray job logs -f {job.job_id} --address {job.address}")
        return
    try:
        status = follow(job)
    except KeyboardInterrupt:
        typer.echo(f"\nthe job keeps running; stop it with: ray job stop {job.job_id} --address {job.address}")
        raise typer.Exit(130) from None
    except (OSError, RuntimeError) as e:
        typer.echo(f"lost the job's log ({e}); it may still be running: ray job status {job.job_id} "
                   f"--address {job.address}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"job {job.job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)



def register(commands: Commands) -> None:
    """Add `submit`."""
    commands.app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(submit)
