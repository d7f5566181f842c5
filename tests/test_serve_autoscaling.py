"""An online job to S3 through the Serve app: its queue of tours scales the model deployment up, and the replicas
scale back down when it drains."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from bench.common import free_port
from diffpano.manifest import read_manifest

OUTPUT_ROOT = "s3://diffpano-test/served"


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
    url = scaling_server
    replicas, stop, started = [], threading.Event(), time.monotonic()

    def watch():
        while not stop.is_set():
            replicas.append((round(time.monotonic() - started, 1), running_replicas()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        specs = [{"tour_id": f"scale-{i}", "prompt": f"room {i}", "num_views": 2, "num_inference_steps": 12}
                 for i in range(60)]
        r = requests.post(f"{url}/v1/jobs", json={"specs": specs, "output": "jobs/scale"}, timeout=120)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 300
        while (status := requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json())["state"] not in ("done",
                                                                                                        "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["state"] == "done" and status["tours_done"] == 60, status
        assert max(n for _, n in replicas) == 2, replicas  # the job's queue brought a second replica
        job_seconds = time.monotonic() - started
        drained = time.monotonic() + 90
        while running_replicas() > 1:
            assert time.monotonic() < drained, "the replicas did not scale back down after the job"
            time.sleep(0.5)
        up = next(t for t, n in replicas if n == 2)
        print(f"job {job_seconds:.0f} s; second replica at {up} s; back to one at {time.monotonic() - started:.0f} s")
    finally:
        stop.set()
        watcher.join()
    table = read_manifest(f"{OUTPUT_ROOT}/jobs/scale").to_pandas()
    assert table.tour_id.nunique() == 60 and len(table) == 120 and not table.duplicated(["tour_id", "view_index"]).any()
    assert status["manifest_uri"].startswith(OUTPUT_ROOT)
