"""An online job to S3 through the Serve app: its queue of tours scales the model deployment up, and the replicas
scale back down when it drains."""

from __future__ import annotations

import time

import pytest
import requests
from helpers import free_port, wait_until

from diffpano.io.manifest import read_manifest

OUTPUT_ROOT = "s3://diffpano-test/served"


pytestmark = pytest.mark.ray  # bulk jobs, dataset builds and training run on Ray here


@pytest.fixture(scope="module")
def scaling_server(ray_local, tiny_model_dir, s3_endpoint):
    """The app with the tiny model writing to S3; the model deployment autoscales between 1 and 2 replicas."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    args = {"model": str(tiny_model_dir), "output_root": OUTPUT_ROOT, "job_concurrency": 4, "max_batch_views": 4,
            "batch_wait_timeout_s": 0.05}
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 2, "look_back_period_s": 2}
    deployments = [{"name": "DiffPanoAPI", "ray_actor_options": {"num_cpus": 0}},
                   {"name": "PanoGenerator", "ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 2,
                    "autoscaling_config": scaling}]
    serve.run(build_app(args, deployments), name="scaling", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while not healthy(url):
        assert time.monotonic() < deadline, "the app did not become healthy"
        time.sleep(1)
    yield url
    serve.shutdown()


def healthy(url: str) -> bool:
    """True once /healthz answers 200."""
    try:
        return requests.get(f"{url}/healthz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def running_replicas() -> int:
    """RUNNING replicas of the model deployment."""
    from ray import serve

    states = serve.status().applications["scaling"].deployments["PanoGenerator"].replica_states
    return states.get("RUNNING", 0)



def test_a_job_scales_the_model_replicas_up_and_they_scale_down_when_it_drains(scaling_server):
    """A job of 400 tours, more than one replica gets through before a second one starts, keeps a queue in front
    of the model deployment: it is still running when the second replica is RUNNING (the state is polled, not
    sampled on a clock). Cancelling it drains the queue, and the deployment goes back to one replica."""
    url = scaling_server
    specs = [{"tour_id": f"scale-{i}", "prompt": f"room {i}", "num_views": 2, "num_inference_steps": 12}
             for i in range(400)]
    r = requests.post(f"{url}/v1/jobs", json={"specs": specs, "output": "jobs/scale"}, timeout=120)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    started = time.monotonic()

    def job() -> dict:
        return requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()

    def scaled_up() -> bool:
        status = job()
        assert status["state"] in ("queued", "running"), status  # ended before a second replica ran: nothing to see
        return running_replicas() == 2

    wait_until(scaled_up, "a second model replica while the job runs", poll_s=0.5)
    up = time.monotonic() - started
    r = requests.delete(f"{url}/v1/jobs/{job_id}", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    wait_until(lambda: running_replicas() == 1, "the replicas to scale down after the job drained", 120, poll_s=0.5)

    def settled() -> tuple[dict, object] | None:
        """The job's status and manifest once every tour it counts as done is in the manifest (tours that were in
        flight at the cancel finish and are stored)."""
        status, table = job(), read_manifest(f"{OUTPUT_ROOT}/jobs/scale").to_pandas()
        return (status, table) if table.tour_id.nunique() == status["tours_done"] else None

    status, table = wait_until(settled, "the tours in flight at the cancel to be stored", 60, poll_s=0.5)
    print(f"second replica at {up:.0f} s; back to one at {time.monotonic() - started:.0f} s; "
          f"{status['tours_done']} tours done")
    assert status["state"] == "cancelled" and 0 < status["tours_done"] < 400, status
    # What the job wrote is whole and written once: each tour with both of its views.
    assert not table.duplicated(["tour_id", "view_index"]).any() and len(table) == 2 * status["tours_done"]
    assert status["manifest_uri"].startswith(OUTPUT_ROOT)
