"""The online job runner on its own (no Ray): replicas sharing an output root through the job records under _jobs,
one lease per job: progress and cancels cross replicas, a quiet owner's job is taken over by exactly one other."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np

from diffpano.io import storage
from diffpano.io.manifest import Tour, commit_tours, read_manifest
from diffpano.io.storage import create_once
from diffpano.specs import BulkSpec
from serve.jobstore import JobRecord, JobStore
from serve.online import JobRunner


def spec(tour_id: str) -> BulkSpec:
    return BulkSpec.model_validate({"tour_id": tour_id, "prompt": "a room", "num_views": 1})


async def fake_generate(s: BulkSpec, out: str) -> None:
    """Store a 1-view tour of the spec, as the model deployment would."""
    images = np.zeros((1, 8, 16, 3), dtype=np.uint8)
    await asyncio.to_thread(commit_tours, out, [Tour(s.tour_id, images, ["a room"], np.eye(4)[None], 0, "m", 1, 5.0)])


class Model:
    """A fake model deployment that counts the tours each replica asks for; each takes `seconds`."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds, self.calls = seconds, Counter()

    def for_replica(self, name: str):
        async def generate(s: BulkSpec, out: str) -> None:
            self.calls[name, s.tour_id] += 1
            await asyncio.sleep(self.seconds)
            await fake_generate(s, out)

        return generate

    def tours(self, name: str | None = None) -> list[str]:
        """Tour ids asked for (by one replica), with repeats."""
        return sorted(t for (r, t), n in self.calls.items() for _ in range(n) if name in (None, r))


def replica(root: str, model: Model, name: str, **kw) -> JobRunner:
    return JobRunner(root, model.for_replica(name), name, concurrency=2, **kw)


async def until(check, what: str, timeout_s: float = 20):
    """Await check() (a coroutine function) until it returns something true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (value := await check()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def test_a_new_runner_resumes_unfinished_jobs_without_redoing_tours(tmp_path):
    root = str(tmp_path / "served")
    out = storage.join(root, "jobs", "a")
    asyncio.run(fake_generate(spec("t0"), out))  # done before the old replica died
    store = JobStore(root)
    for job_id, state, n in (("job-a", "running", 3), ("job-b", "done", 1)):
        job_out = out if job_id == "job-a" else storage.join(root, "jobs", "b")
        store.create(job_id, job_out, [spec(f"t{i}") for i in range(n)])
        assert store.claim(job_id, "old", 1)
        store.write(JobRecord(job_id=job_id, state=state, tours_total=n, tours_done=1, tours_failed=0,
                              tours_running=1, manifest_uri="m", owner="old", epoch=1, beat=7))
    model = Model()

    async def run() -> tuple[list[int], dict]:
        runner = replica(root, model, "new", lease_s=0.2)
        passes = [await runner.take_over()]  # the first look only notes each lease
        await asyncio.sleep(0.25)
        passes += [await runner.take_over(), await runner.take_over()]  # unchanged for a lease: taken, once
        await runner.jobs["job-a"].task
        return passes, (await runner.status("job-a")).model_dump()

    passes, status = asyncio.run(run())
    assert passes == [0, 1, 0]
    assert model.tours() == ["t1", "t2"]  # t0 was already in the manifest; the finished job-b is left alone
    assert status["state"] == "done" and status["tours_done"] == 3 and status["tours_running"] == 0
    assert sorted(read_manifest(out)["tour_id"].to_pylist()) == ["t0", "t1", "t2"]
    record = store.read("job-a")
    assert (record.owner, record.epoch, record.state) == ("new", 2, "done")
    assert store.read("job-b").owner == "old"


def test_a_job_whose_output_cannot_be_read_ends_failed_with_the_error(tmp_path):
    root = str(tmp_path / "served")
    broken = storage.join(root, "jobs", "broken", "manifest", "part-0.parquet")
    storage.write_bytes(broken, b"not parquet")  # the output's manifest cannot be read, so nothing is known done
    model = Model()

    async def run() -> tuple[dict, list[dict]]:
        runner = replica(root, model, "r")
        status = await runner.start_job([spec("t0")], "jobs/broken")
        job = runner.jobs[status.job_id]
        await job.task
        return (await runner.status(status.job_id)).model_dump(), job.errors

    status, errors = asyncio.run(run())
    assert status["state"] == "failed" and status["tours_done"] == 0 and model.tours() == [], status
    # The error is the job's (no tour named): the read that failed, with the part it could not read.
    assert len(errors) == 1 and errors[0]["tour_id"] is None, errors
    assert errors[0]["error"].startswith("ArrowInvalid: ") and "part-0.parquet" in errors[0]["error"], errors
    assert JobStore(root).read(status["job_id"]).state == "failed"  # recorded, so no replica takes it over


def test_another_replica_reports_live_progress_and_its_cancel_stops_the_owner(tmp_path):
    """B did not start the job: its status follows A's progress within a heartbeat, and a cancel through B stops A
    from launching tours (those in flight finish), with no state ever going back."""
    root = str(tmp_path / "served")
    model = Model(seconds=0.05)

    async def run() -> tuple[list[dict], dict, int]:
        a = replica(root, model, "a", heartbeat_s=0.05, lease_s=5)
        b = replica(root, model, "b", heartbeat_s=0.05, lease_s=5)
        started = await a.start_job([spec(f"t{i}") for i in range(200)], None)
        job = a.jobs[started.job_id]
        seen = [(await b.status(started.job_id)).model_dump()]
        await until(lambda: _progress(b, started.job_id, 5), "B to see five tours done")
        seen.append((await b.status(started.job_id)).model_dump())
        assert 0 <= job.done - seen[-1]["tours_done"] <= 4, (job.done, seen[-1])  # one heartbeat behind at most
        cancelled = await b.cancel(started.job_id)
        launched = len(model.tours("a"))
        assert cancelled.state == "cancelled" and job.cancelled is False  # A learns it from the record
        await job.task
        final = (await b.status(started.job_id)).model_dump()
        return seen, final, len(model.tours("a")) - launched

    seen, final, after_cancel = asyncio.run(run())
    assert seen[0]["state"] in ("queued", "running") and seen[0]["tours_total"] == 200
    assert final["state"] == "cancelled" and final["tours_running"] == 0, final
    assert after_cancel <= 2, after_cancel  # at most the tours that had already passed the check (concurrency 2)
    assert final["tours_done"] == len(read_manifest(final["manifest_uri"].removesuffix("/manifest"))) < 200
    assert model.tours("b") == []


async def _progress(runner: JobRunner, job_id: str, done: int) -> bool:
    return (await runner.status(job_id)).tours_done >= done


def test_a_dead_owners_job_is_taken_over_by_exactly_one_replica(tmp_path):
    """A dies mid-job (its tasks end without a word); B and C both watch: one claims the job, it finishes there,
    and no tour is generated by both."""
    root = str(tmp_path / "served")
    model = Model(seconds=0.02)

    async def run() -> tuple[str, list[int], JobRecord]:
        a = replica(root, model, "a", heartbeat_s=0.05)
        started = await a.start_job([spec(f"t{i}") for i in range(40)], None)
        await until(lambda: _progress(a, started.job_id, 5), "A's first tours")
        a.jobs[started.job_id].task.cancel()  # the replica is gone: no final record, no more heartbeats
        watchers = {n: replica(root, model, n, heartbeat_s=0.05, lease_s=0.3) for n in "bc"}
        adopted = [0, 0]
        while not any(r.jobs for r in watchers.values()):
            counts = await asyncio.gather(*(r.take_over() for r in watchers.values()))
            adopted = [x + y for x, y in zip(adopted, counts, strict=True)]
            await asyncio.sleep(0.05)
        [owner] = [n for n, r in watchers.items() if r.jobs]
        await watchers[owner].jobs[started.job_id].task
        for _ in range(3):  # later looks start nothing: the job is finished
            assert await asyncio.gather(*(r.take_over() for r in watchers.values())) == [0, 0]
        return owner, adopted, JobStore(root).read(started.job_id)

    owner, adopted, record = asyncio.run(run())
    assert sorted(adopted) == [0, 1], adopted
    assert (record.owner, record.epoch, record.state, record.tours_done) == (owner, 2, "done", 40), record
    assert not set(model.tours("b")) & set(model.tours("c"))
    assert sorted(set(model.tours())) == sorted(f"t{i}" for i in range(40))
    assert len(model.tours()) - 40 <= 2  # repeated: at most the tours A had in flight when it died


def test_an_owner_that_lost_its_lease_stops_and_records_nothing(tmp_path):
    """A is alive but its record stalls for a lease (a long pause): B takes the job over, and A, on its next
    launch, sees the newer lease, launches no more tours and leaves B's record alone."""
    root = str(tmp_path / "served")
    model = Model(seconds=0.05)

    async def run() -> tuple[int, JobRecord]:
        a = replica(root, model, "a", heartbeat_s=1000)  # beats once, at the start
        started = await a.start_job([spec(f"t{i}") for i in range(60)], None)
        job_a = a.jobs[started.job_id]
        b = replica(root, model, "b", heartbeat_s=0.05, lease_s=0.2)
        await b.take_over()
        await asyncio.sleep(0.25)
        assert await b.take_over() == 1
        launched = len(model.tours("a"))
        await job_a.task  # ends: superseded
        assert job_a.superseded and len(model.tours("a")) - launched <= 2
        await b.jobs[started.job_id].task
        return len(model.tours("a")), JobStore(root).read(started.job_id)

    by_a, record = asyncio.run(run())
    assert (record.owner, record.epoch, record.state, record.tours_done) == ("b", 2, "done", 60), record
    assert by_a < 60


def test_a_lease_is_created_once_locally(tmp_path):
    uri = str(tmp_path / "x" / "lease-1")
    assert [create_once(uri, b"a"), create_once(uri, b"b")] == [True, False]
    assert storage.read_bytes(uri) == b"a"


def test_racing_claims_on_s3_give_an_epoch_to_one_replica(s3_endpoint):
    from concurrent.futures import ThreadPoolExecutor

    store = JobStore("s3://diffpano-test/claims")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: store.claim("job-x", f"r{i}", 1), range(8)))
    assert won.count(True) == 1, won
    assert store.lease("job-x") == 1 and not store.claim("job-x", "late", 1) and store.claim("job-x", "next", 2)


def test_a_status_record_rewritten_on_s3_while_it_is_read_never_reads_torn(s3_endpoint):
    """pyarrow reads an S3 object in two requests (its size, then its bytes): a heartbeat rewriting the record between
    them cuts the read short. Records are read in one GET: 200 reads during constant rewrites all parse."""
    import threading

    store = JobStore("s3://diffpano-test/torn")

    def record(beat: int) -> JobRecord:
        return JobRecord(job_id="job-t", state="running", tours_total=9, tours_done=0, tours_failed=0,
                         tours_running=0, manifest_uri="m", owner="r" * (beat % 7), epoch=1, beat=beat)

    store.write(record(0))
    stop = threading.Event()

    def heartbeat() -> None:
        beat = 0
        while not stop.is_set():
            beat += 1
            store.write(record(beat))  # lengths vary with the owner field

    writer = threading.Thread(target=heartbeat)
    writer.start()
    try:
        beats = [store.read("job-t").beat for _ in range(200)]
    finally:
        stop.set()
        writer.join()
    assert beats == sorted(beats) and beats[-1] > beats[0], beats[:5]
