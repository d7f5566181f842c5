"""Job submission to a real Ray head (`ray start --head`, dashboard on 127.0.0.1): tiny training and bulk jobs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, plain
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.io.manifest import read_manifest

app = build_app()


pytestmark = pytest.mark.ray  # bulk jobs, dataset builds and training run on Ray here


@pytest.fixture(scope="module")
def head():
    """A Ray head of its own (own temp dir, ports and process group), killed with its workers afterwards."""
    temp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths live under it
    port, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # jobs run `python` of this venv
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", "--num-cpus=2",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(1)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the head, raylet, dashboard and workers share the process group
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def submit(address: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["submit", *args, "--address", address])
    return result.exit_code, plain(result.output)


@pytest.mark.slow  # over two minutes; `make test-slow` (and CI) runs it
def test_a_training_job_runs_both_stages_on_the_cluster(head, train_dataset, tmp_path):
    store = str(tmp_path / "runs")
    code, text = submit(head, "train", "all", "--config", "trainer/configs/tiny.yaml", "--name", "job", "--storage",
                        store, "--set", f"data.dataset={train_dataset}", "--set", "stage1.steps=2",
                        "--set", "stage2.steps=2")
    assert code == 0, text
    assert "SUCCEEDED" in text and "stage2 step 2/2" in text  # the job's log is streamed back
    assert "Ignoring upload" not in text  # Ray's packaging chatter is kept out
    for stage in ("stage1", "stage2"):
        assert list((Path(store) / "job" / stage).glob("checkpoint_*"))
    assert (Path(store) / "job" / "model" / "model_index.json").is_file()


def test_a_bulk_job_writes_its_tours_on_the_cluster(head, tiny_model_dir, tmp_path):
    out = str(tmp_path / "tours")
    code, text = submit(head, "bulk", "--synthetic", "3", "--views", "2", "--steps", "2", "--model",
                        str(tiny_model_dir), "--out", out, "--batch-size", "2")
    assert code == 0, text
    assert "SUCCEEDED" in text
    table = read_manifest(out).to_pandas()
    assert len(table) == 6 and not table.duplicated(["tour_id", "view_index"]).any()
    assert all((Path(out) / uri).is_file() for uri in table.image_uri)


def test_a_failing_job_exits_non_zero(head, tmp_path):
    code, text = submit(head, "bulk", "--specs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert code == 1 and "FAILED" in text


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "--out", "/x"], "KIND: expected one of train, bulk"),
    (["bulk", "--synthetic", "2"], "--out: required for a cluster job"),
    (["bulk", "--synthetic", "2", "--out", "outputs/x"], "--out: must be an s3:// URI or an absolute path"),
    (["train", "all", "--config", "c.yaml", "--name", "n", "--storage=runs"], "--storage: must be an s3:// URI"),
    (["bulk", "--specs", "s.jsonl", "--out", "s3://b/p", "--endpoint", "http://h:1"], "--endpoint: an online job"),
])
def test_jobs_that_cannot_work_on_a_cluster_are_refused_before_submission(args, message):
    code, text = submit("http://127.0.0.1:9", *args)  # nothing listens there: a refusal must come first
    assert code == 2 and message in text.replace("\n", " ")


def test_an_unreachable_cluster_is_reported_without_a_traceback(tmp_path):
    code, text = submit("http://127.0.0.1:9", "bulk", "--synthetic", "2", "--out", str(tmp_path / "o"))
    assert code == 1 and "submission failed" in text and "Traceback" not in text


def test_jobs_get_storage_endpoints_and_keys_but_never_local_profiles(monkeypatch):
    from cluster.submit import job_env

    env = {"AWS_ENDPOINT_URL": "http://s3.local", "AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_PROFILE": "me", "AWS_SHARED_CREDENTIALS_FILE": "/home/me/.aws/c"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert {k: v for k, v in job_env().items() if k in env} == {k: env[k] for k in (
        "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert set(job_env(credentials=False)) & set(env) == {"AWS_ENDPOINT_URL", "AWS_REGION"}
