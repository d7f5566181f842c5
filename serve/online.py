"""Online bulk jobs (POST /v1/jobs): tours of a spec list sent through the model deployment by the ingress replica that
holds the job's lease; its record under OUTPUT_ROOT/_jobs (serve.jobstore) lets any replica report, cancel and take
it over."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from diffpano.io import storage
from diffpano.pipelines.tours import error_text, pending, record_failures
from diffpano.specs import BulkSpec, SpecError, read_spec_rows, validate_specs
from serve.jobstore import FINISHED, JobRecord, JobStore
from serve.schemas import JobRequest, JobStatus, State, WebhookEvent, inline_only
from serve.webhooks import Webhook

BACKOFF_S = 1.0
logger = logging.getLogger(__name__)


class Job:
    """One job's specs, output and progress, run under one epoch of its lease."""

    def __init__(self, job_id: str, specs: list[BulkSpec], out: str, epoch: int,
                 webhook: Webhook | None = None) -> None:
        self.job_id, self.specs, self.out, self.epoch, self.webhook = job_id, specs, out, epoch, webhook
        self.state: State = "queued"
        self.done, self.failed, self.running, self.errors = 0, 0, 0, []
        self.cancelled = False
        self.superseded = False  # another replica took the job over: this one launches and records nothing more
        self.beat = 0
        self.task: asyncio.Task | None = None
        self.outbox: asyncio.Queue[tuple[WebhookEvent, dict]] = asyncio.Queue()  # webhook events, delivered in order
        self.notified: tuple = ()  # the counts the last webhook event reported

    def status(self) -> JobStatus:
        """The job's current status."""
        return JobStatus(job_id=self.job_id, state=self.state, tours_total=len(self.specs), tours_done=self.done,
                         tours_failed=self.failed, tours_running=self.running,
                         manifest_uri=storage.join(self.out, "manifest"),
                         webhook_failures=None if self.webhook is None else self.webhook.failures)

    def notify(self, event: WebhookEvent) -> None:
        """Queue a webhook event with the job's status now (nothing without a webhook)."""
        if self.webhook is not None:
            self.notified = (self.state, self.done, self.failed)
            self.outbox.put_nowait((event, self.status().model_dump()))

    def progress_due(self) -> bool:
        """Whether a progress event should go out: the counts moved, none is waiting, and the webhook's rate allows."""
        return (self.webhook is not None and self.outbox.empty() and self.webhook.wants_progress()
                and (self.state, self.done, self.failed) != self.notified)

    async def deliver(self) -> None:
        """Send the queued webhook events one after the other, for as long as the job runs here."""
        while True:
            event, data = await self.outbox.get()
            try:
                await self.webhook.send(event, data)
            finally:
                self.outbox.task_done()

    def record(self, owner: str) -> JobRecord:
        """The status with this replica's lease, as status.json holds it."""
        return JobRecord(**self.status().model_dump(), owner=owner, epoch=self.epoch, beat=self.beat)

    def cancel(self) -> None:
        """Launch no more tours; those in flight finish."""
        self.cancelled = True
        if self.state in ("queued", "running"):
            self.state = "cancelled"


Generate = Callable[[BulkSpec, str], Awaitable[None]]


class JobRunner:
    """One replica's share of the jobs: runs those it holds the lease of, `concurrency` tours in flight each, and takes
    over a job whose record has not changed for `lease_s` (its owner is gone)."""

    def __init__(self, root: str, generate: Generate, owner: str, concurrency: int = 4, heartbeat_s: float = 1.0,
                 lease_s: float = 15.0, webhook_key: bytes | None = None) -> None:
        self.root, self.generate, self.owner, self.concurrency = root, generate, owner, concurrency
        self.heartbeat_s, self.lease_s, self.webhook_key = heartbeat_s, lease_s, webhook_key
        self.store = JobStore(root)
        self.jobs: dict[str, Job] = {}  # the jobs running here
        self.finished: set[str] = set()  # jobs seen finished: never read again
        self.quiet: dict[str, tuple[tuple, float]] = {}  # job -> (its record and lease as last seen, since when)

    def specs_of(self, req: JobRequest) -> list[BulkSpec]:
        """Validated specs; ValueError lists the first bad rows with line and field."""
        rows = req.specs if req.specs is not None else read_spec_rows(req.specs_uri)
        specs, errors = validate_specs(rows)
        if not errors:  # then the specs are the rows, in order
            errors = [SpecError(n, *bad) for n, spec in enumerate(specs, 1) if (bad := inline_only(spec.images))]
        if errors:
            raise ValueError("; ".join(str(e) for e in errors[:10]))
        return specs

    async def start_job(self, specs: list[BulkSpec], output: str | None, webhook: dict | None = None) -> JobStatus:
        """Record and start a job of validated specs, with its webhook ({"url", "events"}, checked by the caller);
        OSError when its record can't be stored."""
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        out = storage.join(self.root, output or f"jobs/{job_id}")
        await asyncio.to_thread(self.store.create, job_id, out, specs, webhook)
        if not await asyncio.to_thread(self.store.claim, job_id, self.owner, 1):
            raise OSError(f"{job_id}: lease taken by another replica")
        job = Job(job_id, specs, out, 1, self._webhook(webhook))
        await self._save(job)  # before the 202: any replica can answer for the job from then on
        self._start(job)
        return job.status()

    async def status(self, job_id: str) -> JobStatus | None:
        """A job's status as recorded (at most heartbeat_s old), or None when unknown."""
        return await asyncio.to_thread(self.store.status, job_id)

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Stop launching tours of the job, whichever replica runs it; those in flight finish and stay."""
        status = await self.status(job_id)
        if status is None or status.state in FINISHED:
            return status
        await asyncio.to_thread(self.store.request_cancel, job_id)
        if job_id in self.jobs:
            self.jobs[job_id].cancel()
        status.state = "cancelled"
        return status

    async def watch(self) -> None:
        """Take over jobs whose owner went quiet, every lease_s / 3, for as long as the replica lives."""
        while True:
            try:
                await self.take_over()
            except OSError as err:
                logger.warning("online jobs: output storage unavailable: %s", err)
            except Exception:  # noqa: BLE001 - a bad record must not stop the watching for good
                logger.exception("online jobs: looking for jobs to take over failed")
            await asyncio.sleep(self.lease_s / 3)

    async def take_over(self) -> int:
        """One look at the recorded jobs: claim and start the unfinished ones whose record stayed the same for
        lease_s; returns how many this replica started."""
        started = 0
        for job_id in await asyncio.to_thread(self.store.job_ids):
            if job_id in self.jobs or job_id in self.finished:
                continue
            record = await asyncio.to_thread(self.store.read, job_id)
            if record is None:
                continue  # its POST failed before the 202: nobody was told of the job
            if record.state in FINISHED:
                self.finished.add(job_id)
                continue
            lease = await asyncio.to_thread(self.store.lease, job_id)
            if self._quiet_for_a_lease(record, lease) and await self._adopt(job_id, lease + 1):
                started += 1
        return started

    def _quiet_for_a_lease(self, record: JobRecord, lease: int) -> bool:
        """Whether neither the record nor the lease has changed for lease_s, by this replica's clock (no clocks
        compared). A replica that claimed the job and died before recording it changes the lease, so the next
        epoch is claimed a lease later."""
        token, now = (record.owner, record.epoch, record.beat, lease), time.monotonic()
        seen = self.quiet.get(record.job_id)
        if seen is None or seen[0] != token:
            self.quiet[record.job_id] = (token, now)
            return False
        return now - seen[1] >= self.lease_s

    async def _adopt(self, job_id: str, epoch: int) -> bool:
        """Claim `epoch` of the job (the one after the lease seen quiet) and run it here; False when another replica
        claimed it first."""
        if not await asyncio.to_thread(self.store.claim, job_id, self.owner, epoch):
            return False
        self.quiet.pop(job_id, None)
        out, specs, webhook = await asyncio.to_thread(self.store.load, job_id)
        job = Job(job_id, specs, out, epoch, self._webhook(webhook))
        await self._save(job)
        self._start(job)
        logger.info("online jobs: took over %s (epoch %d)", job_id, epoch)
        return True

    def _webhook(self, webhook: dict | None) -> Webhook | None:
        """The deliveries of a job's webhook as job.json records it ({"url", "events"})."""
        if webhook is None or self.webhook_key is None:
            return None
        return Webhook(webhook["url"], webhook["events"], self.webhook_key)

    def _start(self, job: Job) -> None:
        """Run the job in the replica's event loop."""
        self.jobs[job.job_id] = job
        # a context of its own: not the request's that started it (whose storage calls answer 503 rather than wait)
        job.task = asyncio.get_running_loop().create_task(self._run(job), context=contextvars.Context())

    async def _save(self, job: Job) -> None:
        """Record the job's status and lease (storage I/O off the event loop)."""
        job.beat += 1
        await asyncio.to_thread(self.store.write, job.record(self.owner))

    async def _run(self, job: Job) -> None:
        """Run the job beside its heartbeat; a storage failure ends it as failed, with the error."""
        loop = asyncio.get_running_loop()
        heartbeat = loop.create_task(self._heartbeat(job))
        deliveries = loop.create_task(job.deliver()) if job.webhook is not None else None
        try:
            await self._generate_all(job)
        except Exception as err:  # noqa: BLE001 - reported through the job's status
            job.state = "failed"
            job.errors.append({"tour_id": None, "error": error_text(err)})
        finally:
            heartbeat.cancel()
        if self.jobs.get(job.job_id) is job:  # not when this replica has since taken the job over again
            del self.jobs[job.job_id]
        if not job.superseded:
            await self._finish(job, deliveries)
        if deliveries is not None:
            deliveries.cancel()

    async def _finish(self, job: Job, deliveries: asyncio.Task | None) -> None:
        """Record the finished job, then deliver its completed event and record the webhook's failures with it."""
        try:
            await self._save(job)
            self.finished.add(job.job_id)
            if deliveries is not None:
                job.notify("completed")
                await job.outbox.join()
                await self._save(job)
        except OSError:
            pass  # the record stays unfinished: a replica takes the job over after lease_s and finishes it

    async def _heartbeat(self, job: Job) -> None:
        """Record the job's progress every heartbeat_s (what keeps its lease), noticing a cancel or a takeover."""
        while not job.superseded:
            await asyncio.sleep(self.heartbeat_s)
            await self._stopped(job)
            if job.superseded:
                return
            try:
                await self._save(job)
            except OSError as err:
                logger.warning("online jobs: %s: progress not recorded: %s", job.job_id, err)
            if job.progress_due():
                job.notify("progress")

    async def _stopped(self, job: Job) -> bool:
        """Whether the job must launch no more tours: a replica asked to cancel it, or another took it over (storage
        that can't be read says no)."""
        try:
            if not job.superseded and await asyncio.to_thread(self.store.superseded, job.job_id, job.epoch):
                job.superseded = True
            if not job.cancelled and await asyncio.to_thread(self.store.cancel_requested, job.job_id):
                job.cancel()
        except OSError as err:
            logger.warning("online jobs: %s: lease not checked: %s", job.job_id, err)
        return job.cancelled or job.superseded

    async def _generate_all(self, job: Job) -> None:
        """Generate the specs not yet in the output's manifest, a few at a time."""
        todo = await asyncio.to_thread(pending, job.out, job.specs)
        job.done = len(job.specs) - len(todo)
        if not job.cancelled:
            job.state = "running"
        if job.epoch == 1:
            job.notify("start")
        gate = asyncio.Semaphore(self.concurrency)

        async def one(spec: BulkSpec) -> None:
            async with gate:
                if await self._stopped(job):
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
        if job.superseded:
            return
        await asyncio.to_thread(record_failures, job.out, job.job_id, job.errors)
        if not job.cancelled:
            job.state = "done" if not job.failed or job.done else "failed"
