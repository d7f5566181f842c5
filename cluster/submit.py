"""Submit `diffpano train` and `diffpano bulk` to a Ray cluster as Ray jobs (the Jobs API on the dashboard port)."""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from diffpano.io import storage

KINDS = ("train", "bulk")
# Where each kind writes: on a cluster a relative path would land in the job's temporary working directory and vanish.
OUTPUT_OPTIONS = {"train": "--storage", "bulk": "--out"}
EXCLUDES = [".git", ".venv", "outputs", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"]
QUIET_LOGGERS = ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk")  # per-file packaging chatter
AGENT_WAIT_S = 90.0  # a freshly started head answers "No available agent" until its dashboard agent is up
# Paths and profile names of the submitting machine mean nothing on the cluster (and would override its IAM role).
LOCAL_ONLY_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass
class Submission:
    """One submitted job."""

    job_id: str
    address: str
    entrypoint: str


def repository_root() -> str | None:
    """The checkout this package runs from (the folder with pyproject.toml), or None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    return str(root) if (root / "pyproject.toml").is_file() and (root / "diffpano").is_dir() else None


def option_value(args: list[str], option: str) -> str | None:
    """The value of `--option VALUE` or `--option=VALUE` in an argument list (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def check_job(kind: str, args: list[str]) -> None:
    """Refuse what cannot work as a cluster job, naming the argument and the rule."""
    if kind not in KINDS:
        raise ValueError(f"KIND: expected one of {', '.join(KINDS)}, got {kind!r}")
    option = OUTPUT_OPTIONS[kind]
    target = option_value(args, option)
    if target is None:
        raise ValueError(f"{option}: required for a cluster job (an s3:// URI, or an absolute path on the cluster)")
    if not (storage.is_remote(target) or target.startswith(("/", "file:///"))):
        raise ValueError(f"{option}: must be an s3:// URI or an absolute path on the cluster, got {target!r} "
                         "(a relative path would be written inside the job's temporary working directory)")
    if kind == "bulk" and option_value(args, "--endpoint") is not None:
        raise ValueError("--endpoint: an online job goes to a Serve endpoint (`diffpano bulk --endpoint`), "
                         "not through `diffpano submit`")


def entrypoint(kind: str, args: list[str]) -> str:
    """The job's shell command: the cluster's Python runs the `diffpano` CLI from the working directory."""
    return shlex.join(["python", "-m", "diffpano.cli", kind, *args])


def job_env(credentials: bool = True) -> dict[str, str]:
    """The storage variables a job gets from this shell: endpoints and region, and the keys unless left out."""
    skip = LOCAL_ONLY_ENV + (() if credentials else CREDENTIAL_ENV)
    return {k: v for k, v in storage.worker_env().items() if k not in skip}


def runtime_env(working_dir: str | None, env: dict[str, str] | None = None) -> dict:
    """The job's runtime environment: the repository as working directory and the given variables."""
    renv: dict = {"env_vars": dict(env or {})}
    if working_dir:
        renv.update(working_dir=working_dir, excludes=EXCLUDES)
    return renv


def submit_job(client: JobSubmissionClient, wait_agent_s: float = AGENT_WAIT_S, **job) -> str:
    """`client.submit_job`, retried while a new head's job agent is not up yet."""
    deadline = time.monotonic() + wait_agent_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def submit(kind: str, args: list[str], address: str | None = None, working_dir: str | None = None,
           submission_id: str | None = None, credentials: bool = True) -> Submission:
    """Check the job, then submit it; returns its id (the same id again is refused by Ray)."""
    check_job(kind, args)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    client = JobSubmissionClient(address)
    command = entrypoint(kind, args)
    job_id = submit_job(client, entrypoint=command, runtime_env=runtime_env(working_dir, job_env(credentials)),
                        submission_id=submission_id or f"diffpano-{kind}-{uuid.uuid4().hex[:8]}",
                        metadata={"diffpano": kind})
    return Submission(job_id, client.get_address(), command)


async def _print_logs(client: JobSubmissionClient, job_id: str) -> None:
    """Print the job's log as it comes."""
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow(job: Submission, poll_s: float = 2.0) -> str:
    """Stream the job's log until it ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
    client = JobSubmissionClient(job.address)
    asyncio.run(_print_logs(client, job.job_id))
    status = client.get_job_status(job.job_id)
    while not status.is_terminal():  # the log stream can end a moment before the status does
        time.sleep(poll_s)
        status = client.get_job_status(job.job_id)
    return str(status.value if isinstance(status, JobStatus) else status)
