"""The online job runner on its own (no Ray): a restarted replica resumes what a previous one left unfinished."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from diffpano.io import storage
from diffpano.io.manifest import Tour, commit_tours, read_manifest
from diffpano.specs import BulkSpec
from serve.online import JobRunner


def spec(tour_id: str) -> BulkSpec:
    return BulkSpec.model_validate({"tour_id": tour_id, "prompt": "a room", "num_views": 1})


async def fake_generate(s: BulkSpec, out: str) -> None:
    """Store a 1-view tour of the spec, as the model deployment would."""
    images = np.zeros((1, 8, 16, 3), dtype=np.uint8)
    await asyncio.to_thread(commit_tours, out, [Tour(s.tour_id, images, ["a room"], np.eye(4)[None], 0, "m", 1, 5.0)])


def test_a_new_runner_resumes_unfinished_jobs_without_redoing_tours(tmp_path):
    root = str(tmp_path / "served")
    out = storage.join(root, "jobs", "a")
    asyncio.run(fake_generate(spec("t0"), out))  # done before the old replica died
    record = {"job_id": "job-a", "state": "running", "out": out,
              "specs": [spec(f"t{i}").model_dump(exclude_none=True) for i in range(3)]}
    finished = {"job_id": "job-b", "state": "done", "out": storage.join(root, "jobs", "b"), "specs": []}
    for r in (record, finished):
        storage.write_bytes(storage.join(root, "_jobs", f"{r['job_id']}.json"), json.dumps(r).encode())
    calls: list[str] = []

    async def generate(s: BulkSpec, o: str) -> None:
        calls.append(s.tour_id)
        await fake_generate(s, o)

    async def run() -> tuple[int, int, dict]:
        runner = JobRunner(root, generate)
        first = await runner.resume()
        again = await runner.resume()  # a second call starts nothing twice
        await runner.jobs["job-a"].task
        return first, again, runner.status("job-a").model_dump()

    first, again, status = asyncio.run(run())
    assert (first, again) == (1, 0)
    assert sorted(calls) == ["t1", "t2"]  # t0 was already in the manifest
    assert status["state"] == "done" and status["tours_done"] == 3
    assert sorted(read_manifest(out)["tour_id"].to_pylist()) == ["t0", "t1", "t2"]
    assert json.loads(storage.read_bytes(storage.join(root, "_jobs", "job-a.json")))["state"] == "done"


def test_a_job_whose_output_cannot_be_read_ends_failed_with_the_error(tmp_path):
    root = str(tmp_path / "served")
    broken = storage.join(root, "jobs", "broken", "manifest", "part-0.parquet")
    storage.write_bytes(broken, b"not parquet")  # the output's manifest cannot be read, so nothing is known done
    generated: list[str] = []

    async def generate(s: BulkSpec, out: str) -> None:
        generated.append(s.tour_id)
        await fake_generate(s, out)

    async def run() -> tuple[dict, list[dict]]:
        runner = JobRunner(root, generate)
        status = await runner.start_job([spec("t0")], "jobs/broken")
        job = runner.jobs[status.job_id]
        await job.task
        return runner.status(status.job_id).model_dump(), job.errors

    status, errors = asyncio.run(run())
    assert status["state"] == "failed" and status["tours_done"] == 0 and generated == [], status
    # The error is the job's (no tour named): the read that failed, with the part it could not read.
    assert len(errors) == 1 and errors[0]["tour_id"] is None, errors
    assert errors[0]["error"].startswith("ArrowInvalid: ") and "part-0.parquet" in errors[0]["error"], errors
    record = json.loads(storage.read_bytes(storage.join(root, "_jobs", f"{status['job_id']}.json")))
    assert record["state"] == "failed"  # stored, so a restarted replica does not resume it
