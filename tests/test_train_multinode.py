"""Ray Train across two nodes of a multi-node cluster (Ray's harness on this machine) that loses one mid-stage."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import multinode_cluster, plain, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # minutes each: make test-slow

STEPS = 30  # about a quarter of a second each: the kill comes mid-stage


def start_training(address: str, dataset: str, store: Path, capacity_wait_s: float) -> subprocess.Popen:
    """`diffpano train stage1` with two one-CPU workers and a checkpoint every step, on the cluster at address."""
    cmd = [sys.executable, "-m", "diffpano.cli", "train", "stage1", "--config", "trainer/configs/tiny.yaml",
           "--name", "two-nodes", "--storage", str(store)]
    for setting in (f"data.dataset={dataset}", f"stage1.steps={STEPS}", "run.checkpoint_every=1",
                    "scaling.num_workers=2", "scaling.cpus_per_worker=1", f"run.capacity_wait_s={capacity_wait_s}"):
        cmd += ["--set", setting]
    env = os.environ | {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def logged(store: Path) -> list[tuple[float, int]]:
    """(time, step) of each line of the stage's metrics.csv so far."""
    path = store / "two-nodes" / "logs" / "stage1" / "metrics.csv"
    if not path.exists():
        return []
    return [(float(r["time"]), int(r["step"])) for r in csv.DictReader(path.read_text().splitlines())]


def check_resumed(rows: list[tuple[float, int]], killed_at: float) -> None:
    """Steps up to the kill, then on from the last checkpoint Train had taken in: none trained twice past it."""
    before = [s for t, s in rows if t < killed_at]
    after = [s for t, s in rows if t > killed_at]
    assert before == list(range(1, len(before) + 1)) and 4 <= len(before) < STEPS, rows
    # Step k is logged just before its checkpoint is reported, and a report returns only once the previous step's
    # checkpoint was taken in: at the kill, Train holds the checkpoint of k, k - 1 or k - 2. A restart from scratch
    # would log 1, 2, ... again; a resume goes on right after the checkpoint it holds.
    last = before[-1]
    assert after in [list(range(resumed + 1, STEPS + 1)) for resumed in (last, last - 1, last - 2)], (before, after)


def generates(model: Path) -> None:
    """The exported model loads and generates a two-view tour."""
    from diffpano.geometry.trajectories import walk
    from diffpano.pipelines import MultiViewPanoPipeline

    pipe = MultiViewPanoPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    assert pipe(["a kitchen"] * 2, walk(2), num_inference_steps=2, seed=0).images.shape == (1, 2, 16, 32, 3)


def kill_mid_stage(cluster, node, proc: subprocess.Popen, store: Path) -> float:
    """Remove a worker's node (no goodbye) once four steps are logged; the time of the kill."""
    wait_until(lambda: len(logged(store)) >= 4 or proc.poll() is not None, "four steps", 300, poll_s=0.05)
    assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
    cluster.remove_node(node, allow_graceful=False)
    return time.time()


def test_a_stage_resumes_from_its_checkpoint_when_a_lost_node_is_replaced(train_dataset, tmp_path):
    with multinode_cluster(2) as (cluster, nodes):
        proc = start_training(cluster.address, train_dataset, tmp_path, capacity_wait_s=300)
        try:
            killed_at = kill_mid_stage(cluster, nodes[0], proc, tmp_path)
            time.sleep(5)
            cluster.add_node(num_cpus=1)  # capacity comes back, as an autoscaler would add it
            text = plain(proc.communicate(timeout=600)[0].decode(errors="replace"))
        finally:
            proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert f"stage1: {STEPS} steps" in text, text[-3000:]
    check_resumed(logged(tmp_path), killed_at)
    generates(tmp_path / "two-nodes" / "model")


def test_with_no_room_after_a_node_loss_the_stage_stops_clearly_and_the_same_command_resumes(train_dataset,
                                                                                             tmp_path):
    with multinode_cluster(2) as (cluster, nodes):
        proc = start_training(cluster.address, train_dataset, tmp_path, capacity_wait_s=20)
        try:
            killed_at = kill_mid_stage(cluster, nodes[0], proc, tmp_path)
            text = plain(proc.communicate(timeout=600)[0].decode(errors="replace"))
        finally:
            proc.kill()
        assert proc.returncode == 3, text[-3000:]
        assert ("train stopped: stage1: the cluster had no room for 2 workers of 1 CPU for 20s "
                "(run.capacity_wait_s); run the same command again") in text, text[-3000:]
        # (Ray Train's workers and controller also log the failures they saw, with their tracebacks)
        stopped_at = len(logged(tmp_path))
        assert stopped_at < STEPS
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        again = start_training(cluster.address, train_dataset, tmp_path, capacity_wait_s=20)
        text = plain(again.communicate(timeout=600)[0].decode(errors="replace"))
    assert again.returncode == 0 and f"stage1: {STEPS} steps" in text, text[-3000:]
    check_resumed(logged(tmp_path), killed_at)
    generates(tmp_path / "two-nodes" / "model")
