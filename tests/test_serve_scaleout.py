"""Two ingress replicas (the `server` fixture, as serve/config.yaml): job state lives in the job records under the
output root, so either replica answers and cancels any job, and a lost replica's job is taken over by exactly one."""

from __future__ import annotations

import time

import requests
from helpers import KEY, post, wait_until

from diffpano.io.manifest import read_manifest
from serve.ingress import REPLICA_HEADER
from serve.jobstore import JobStore


def get(url: str, path: str, method: str = "GET") -> requests.Response:
    return requests.request(method, url + path, headers={"X-API-Key": KEY}, timeout=60)


def replicas(state: str = "RUNNING") -> int:
    """Ingress replicas in this state."""
    from ray import serve

    return serve.status().applications["diffpano"].deployments["DiffPanoAPI"].replica_states.get(state, 0)


def start(url: str, name: str, tours: int, steps: int = 8) -> tuple[str, str]:
    """(job id, the replica that answered the POST) of a job of 1-view tours written under jobs/NAME."""
    specs = [{"tour_id": f"{name}-{i}", "prompt": f"a hall {i}", "num_views": 1, "num_inference_steps": steps}
             for i in range(tours)]
    r = post(url, "/v1/jobs", {"specs": specs, "output": f"jobs/{name}"})
    assert r.status_code == 202, r.text
    return r.json()["job_id"], r.headers[REPLICA_HEADER]


def tours_stored(out, name: str) -> int:
    return read_manifest(str(out / "jobs" / name)).to_pandas().tour_id.nunique()


def answer(url: str, job_id: str, replica: str | None = None, other_than: set[str] = frozenset()) -> dict | None:
    """The job's status when the replica that answers is the given one (or none of other_than), else None."""
    r = get(url, f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    by = r.headers[REPLICA_HEADER]
    return r.json() if by not in other_than and replica in (None, by) else None


def until(url: str, job_id: str, check, what: str, timeout_s: float = 120, replica: str | None = None,
          other_than: set[str] = frozenset()) -> dict:
    """Poll the job (as answer() filters the answers) until check(status) holds; that status."""

    def probe() -> dict | None:
        status = answer(url, job_id, replica, other_than)
        return status if status is not None and check(status) else None

    return wait_until(probe, what, timeout_s)


def test_the_replica_that_did_not_start_a_job_reports_its_live_progress(server):
    url, out = server
    assert replicas() == 2
    job_id, starter = start(url, "live", 40)
    seen: list[dict] = []

    def from_the_other() -> dict | None:
        status = answer(url, job_id, other_than={starter})
        if status is not None:
            seen.append(status)
        return status if status and status["tours_done"] >= 3 else None

    first = wait_until(from_the_other, "the other replica to report three tours done", 120)
    assert first["state"] == "running" and first["tours_done"] < 40, first  # progress while the job runs
    # At most a few seconds stale: what the manifest holds now, the other replica reports within 3 s.
    stored, asked = tours_stored(out, "live"), time.monotonic()
    wait_until(lambda: from_the_other() and seen[-1]["tours_done"] >= stored, "the other replica to catch up", 30)
    lag = time.monotonic() - asked
    assert lag < 3.0, lag
    done = [s["tours_done"] for s in seen]
    assert done == sorted(done) and all(0 <= s["tours_running"] <= 2 for s in seen), seen  # one record, read by both
    final = until(url, job_id, lambda s: s["state"] == "done", "the job to finish", 180)
    assert final["tours_done"] == 40 == tours_stored(out, "live")
    print(f"other replica caught up with the manifest in {lag:.2f} s")


def test_a_cancel_through_the_other_replica_stops_the_one_running_the_job(server):
    """Jobs are started until one's DELETE is answered by the replica that did not start it (routing picks at
    random); the starter then launches no new tour, and the counts match the manifest."""
    url, out = server
    for attempt in range(12):
        name = f"cancel{attempt}"
        job_id, starter = start(url, name, 40, steps=10)
        until(url, job_id, lambda s: s["tours_done"] >= 1, "a first tour")
        r = get(url, f"/v1/jobs/{job_id}", "DELETE")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        if r.headers[REPLICA_HEADER] != starter:
            break
        until(url, job_id, lambda s: s["tours_running"] == 0, "the starter's own cancel to drain")
    else:
        raise AssertionError("twelve DELETEs all answered by the replica that started their job")
    for replica in (starter, None):  # the starter itself, and whichever answers
        status = until(url, job_id, lambda s: True, f"an answer from {replica or 'either'}", replica=replica)
        assert status["state"] == "cancelled", status
    final = until(url, job_id, lambda s: s["tours_running"] == 0, "the tours in flight to finish")
    stored = tours_stored(out, name)
    time.sleep(1.0)  # five heartbeats: a starter still launching tours would have stored more by now
    assert final["tours_done"] == stored == tours_stored(out, name) < 40, (final, stored)
    print(f"cancelled across replicas at attempt {attempt + 1}; {stored} of 40 tours stored")


def test_a_jobs_tours_outlive_the_loss_of_their_model_replica(server):
    """The only model replica is killed mid-job: the tours it was generating are sent again once Serve has replaced
    it, and none counts as failed."""
    import ray

    url, out = server
    job_id, _ = start(url, "model", 20)
    until(url, job_id, lambda s: s["tours_done"] >= 2 and s["tours_running"] >= 1, "tours in flight")
    [model] = [a for a in ray.util.list_named_actors(all_namespaces=True) if "PanoGenerator" in a["name"]]
    ray.kill(ray.get_actor(model["name"], namespace=model["namespace"]), no_restart=True)
    final = until(url, job_id, lambda s: s["state"] != "running", "the job to end", 180)
    assert final["state"] == "done" and final["tours_done"] == 20 and final["tours_failed"] == 0, final
    assert tours_stored(out, "model") == 20


def test_a_killed_ingress_replicas_job_is_taken_over_once_and_answered_throughout(server):
    """The replica running a job is killed: the other answers for the job at once, one replica (the survivor or
    the replacement Serve starts) takes the job over after the lease, it finishes with every tour once, and the
    model generated at most the tours in flight at the kill twice."""
    import ray

    url, out = server
    before = get(url, "/v1/stats").json()
    job_id, starter = start(url, "killed", 40)
    until(url, job_id, lambda s: s["tours_done"] >= 3, "three tours")
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(starter)]
    survivor = wait_until(lambda: (by := get(url, "/healthz").headers[REPLICA_HEADER]) != starter and by, "the other")
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    killed = time.monotonic()
    codes: list[int] = []

    def finished() -> bool:
        r = get(url, f"/v1/jobs/{job_id}")
        assert r.status_code in (200, 503), r.text
        codes.append(r.status_code)
        return r.status_code == 200 and r.json()["state"] == "done"

    wait_until(finished, "the job to finish after the kill", 180, poll_s=0.1)
    took_s = time.monotonic() - killed
    assert codes.count(503) <= 2, codes  # answered throughout (a request racing the kill may get 503)
    record = JobStore(str(out)).read(job_id)
    assert record.epoch == 2 and record.owner != starter and record.tours_done == 40, record
    assert JobStore(str(out)).lease(job_id) == 2  # claimed once after the kill: nobody resumed it twice
    assert tours_stored(out, "killed") == 40
    after = get(url, "/v1/stats").json()
    views = sum(after["batch_views"][len(after["batch_views"]) - (after["batches"] - before["batches"]):])
    assert 40 <= views <= 42, views  # the model's work: each tour once, plus at most the 2 in flight at the kill
    wait_until(lambda: replicas() == 2, "Serve to replace the killed replica", 120, poll_s=0.5)
    # The replacement, started after the job ended, answers for it too (it holds nothing of it but the record).
    restarted = until(url, job_id, lambda s: True, "an answer from the replacement", other_than={starter, survivor})
    assert restarted["state"] == "done" and restarted["tours_done"] == 40, restarted
    by = "the survivor" if record.owner == survivor else "the replacement"
    print(f"job taken over by {by}, finished {took_s:.1f} s after its replica was killed; "
          f"{codes.count(503)} of {len(codes)} polls 503")
