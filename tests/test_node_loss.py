"""Bulk jobs on a multi-node Ray cluster (Ray's multi-node harness on this machine) that loses a node mid-job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import check_output, multinode_cluster, plain

pytestmark = pytest.mark.ray  # its own cluster, torn down after

TINY = ["--views", "2", "--steps", "10"]  # about 3 s a tour per replica on 2 cores: the job outlives the kill


@pytest.fixture
def cluster():
    """A head with no CPUs and three worker nodes of one CPU each, torn down after."""
    with multinode_cluster(3) as made:
        yield made


def parts(out: Path) -> int:
    """Manifest parts published so far."""
    folder = out / "manifest"
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


def test_a_bulk_job_finishes_exactly_once_when_a_node_dies(cluster, tiny_model_dir, tmp_path):
    """One of three worker nodes is killed (raylet and workers, no goodbye) once its replica is live and two batches
    are published: the batches its replica held move to the live replicas and the job ends with every tour once."""
    cluster, workers = cluster
    out = tmp_path / "tours"
    cmd = [sys.executable, "-m", "diffpano.cli", "bulk", "--synthetic", "60", *TINY, "--replicas", "3",
           "--batch-size", "2", "--model", str(tiny_model_dir), "--out", str(out), "--stall-timeout", "120"]
    env = os.environ | {"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "disabled"}
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            # every replica live (each then holds two batches while work remains), two batches published
            while parts(out) < 2 or "3/3 live" not in (tmp_path / "log").read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
                time.sleep(0.2)
            cluster.remove_node(workers[1], allow_graceful=False)
            code = proc.wait(timeout=400)
        finally:
            proc.kill()
    text = plain((tmp_path / "log").read_text(errors="replace"))
    assert code == 0, text[-3000:]
    assert "60 tours / 120 views written" in text and "0 failed" in text, text[-3000:]
    assert "4 nodes, 3 CPUs" in text  # the cluster line: the job ran on the cluster it was given
    assert "re-queued" in text  # the bar said that work moved
    check_output(str(out), 60, 2, with_ray=False)  # every tour once, every image a whole PNG
