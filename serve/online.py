"""Online bulk jobs (POST /v1/jobs): tours of a spec list sent through the model deployment, resumable from output."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

from diffpano.io import storage
from diffpano.pipelines.tours import error_text, pending, record_failures
from diffpano.specs import BulkSpec, read_spec_rows, validate_specs
from serve.schemas import JobRequest, JobStatus, State

BACKOFF_S = 1.0


class Job:
    """One job's specs, output and progress."""

    def __init__(self, job_id: str, specs: list[BulkSpec], out: str, state: State = "queued") -> None:
        self.job_id, self.specs, self.out, self.state = job_id, specs, out, state
        self.done, self.failed, self.running, self.errors = 0, 0, 0, []
        self.cancelled = False
        self.task: asyncio.Task | None = None

    def status(self) -> JobStatus:
        """The job's current status."""
        return JobStatus(job_id=self.job_id, state=self.state, tours_total=len(self.specs), tours_done=self.done,
                         tours_failed=self.failed, tours_running=self.running,
                         manifest_uri=storage.join(self.out, "manifest"))


Generate = Callable[[BulkSpec, str], Awaitable[None]]


class JobRunner:
    """Runs jobs in the ingress replica, `concurrency` tours in flight each, recording them under root/_jobs."""

    def __init__(self, root: str, generate: Generate, concurrency: int = 4) -> None:
        self.root, self.generate, self.concurrency = root, generate, concurrency
        self.jobs: dict[str, Job] = {}

    def _record(self, job_id: str) -> str:
        """Where a job's specs and state are kept."""
        return storage.join(self.root, "_jobs", f"{job_id}.json")

    def specs_of(self, req: JobRequest) -> list[BulkSpec]:
        """Validated specs; ValueError lists the first bad rows with line and field."""
        rows = req.specs if req.specs is not None else read_spec_rows(req.specs_uri)
        specs, errors = validate_specs(rows)
        if errors:
            raise ValueError("; ".join(str(e) for e in errors[:10]))
        return specs

    async def start_job(self, specs: list[BulkSpec], output: str | None) -> JobStatus:
        """Record and start a job of validated specs (in the event loop; OSError when its record can't be stored)."""
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        out = storage.join(self.root, output or f"jobs/{job_id}")
        job = Job(job_id, specs, out)
        await self._save(job)
        self._start(job)
        return job.status()

    async def resume(self) -> int:
        """Restart the jobs a previous replica left queued or running (their manifest says what is done)."""
        started = 0
        for record in await asyncio.to_thread(self._unfinished_records):
            if record["job_id"] not in self.jobs:
                specs = [BulkSpec.model_validate(s) for s in record["specs"]]
                self._start(Job(record["job_id"], specs, record["out"]))
                started += 1
        return started

    def _unfinished_records(self) -> list[dict]:
        """The stored records of jobs left queued or running."""
        records = [json.loads(storage.read_bytes(uri))
                   for uri in storage.list_files(storage.join(self.root, "_jobs"), ".json")]
        return [r for r in records if r["state"] in ("queued", "running")]

    def status(self, job_id: str) -> JobStatus | None:
        """A job's status, or None when unknown."""
        job = self.jobs.get(job_id)
        return job.status() if job else None

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Stop launching tours of the job; those in flight finish and stay."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        job.cancelled = True
        if job.state in ("queued", "running"):
            job.state = "cancelled"
            await self._save(job)
        return job.status()

    def _start(self, job: Job) -> None:
        """Run the job in the replica's event loop."""
        self.jobs[job.job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))

    async def _save(self, job: Job) -> None:
        """Persist the job's specs and state (storage I/O off the event loop)."""
        record = {"job_id": job.job_id, "state": job.state, "out": job.out,
                  "specs": [s.model_dump(exclude_none=True) for s in job.specs]}
        await asyncio.to_thread(storage.write_bytes, self._record(job.job_id), json.dumps(record).encode())

    async def _run(self, job: Job) -> None:
        """Run the job; a storage failure ends it as failed, with the error, instead of leaving it queued."""
        try:
            await self._generate_all(job)
        except Exception as err:  # noqa: BLE001 - reported through the job's status
            job.state = "failed"
            job.errors.append({"tour_id": None, "error": error_text(err)})
        try:
            await self._save(job)
        except OSError:
            pass  # the record stays at its last state; a restarted replica resumes the job from its manifest

    async def _generate_all(self, job: Job) -> None:
        """Generate the specs not yet in the output's manifest, a few at a time."""
        todo = await asyncio.to_thread(pending, job.out, job.specs)
        job.done = len(job.specs) - len(todo)
        job.state = "running"
        gate = asyncio.Semaphore(self.concurrency)

        async def one(spec: BulkSpec) -> None:
            async with gate:
                if job.cancelled:
                    return
                job.running += 1
                try:
                    await self.generate(spec, job.out)
                    job.done += 1
                except Exception as err:  # noqa: BLE001 - a failing tour is recorded, the rest go on
                    job.failed += 1
                    job.errors.append({"tour_id": spec.tour_id, "error": error_text(err)})
                finally:
                    job.running -= 1

        await asyncio.gather(*(one(s) for s in todo))
        await asyncio.to_thread(record_failures, job.out, job.job_id, job.errors)
        if not job.cancelled:
            job.state = "done" if not job.failed or job.done else "failed"
