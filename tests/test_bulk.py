"""Offline bulk jobs on a local Ray cluster: SPEC §5 output locally and on S3, exactly once, invalid specs refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from helpers import plain
from typer.testing import CliRunner

from diffpano import storage
from diffpano.cli import app
from diffpano.manifest import decode_rgb, read_manifest

TINY = ["--steps", "2", "--views", "2"]


def bulk(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["bulk", *args])
    return result.exit_code, plain(result.output)


def check_output(root: str, tours: int, views: int) -> None:
    """SPEC §5: one row per view, unique (tour_id, view_index), every image a complete 2:1 PNG; four readers."""
    import duckdb
    import ray

    table = read_manifest(root).to_pandas()
    assert len(table) == tours * views and table.tour_id.nunique() == tours
    assert not table.duplicated(["tour_id", "view_index"]).any()
    for uri in table.image_uri:
        image = decode_rgb(storage.read_bytes(storage.join(root, uri)))
        assert image.shape[1] == 2 * image.shape[0]
    fs, path = storage.resolve(storage.join(root, "manifest"))
    assert pads.dataset(path, filesystem=fs, format="parquet").count_rows() == len(table)
    if not storage.is_remote(root):
        assert duckdb.sql(f"select count(*) from read_parquet('{path}/*.parquet')").fetchall()[0][0] == len(table)
        assert len(__import__("pandas").read_parquet(path)) == len(table)
    assert ray.data.read_parquet(storage.join(root, "manifest")).count() == len(table)


def test_bulk_job_to_a_local_folder_then_compaction_and_a_rerun_add_nothing(ray_local, tiny_model_dir, tmp_path):
    out = str(tmp_path / "bulk")
    code, text = bulk("--synthetic", "5", *TINY, "--out", out, "--model", str(tiny_model_dir), "--batch-size", "2")
    assert code == 0, text
    assert "5 tours / 10 views written" in text and "0 failed" in text
    check_output(out, 5, 2)
    table = read_manifest(out).to_pandas()
    assert table.groupby("tour_id").prompt.nunique().max() >= 1 and set(table.num_inference_steps) == {2}
    result = CliRunner().invoke(app, ["manifest", "compact", out])  # a re-run reads the compacted manifest too
    assert result.exit_code == 0 and "3 parts -> 1, 10 rows" in result.output, result.output
    code, text = bulk("--synthetic", "5", *TINY, "--out", out, "--model", str(tiny_model_dir))
    assert code == 0 and "0 tours / 0 views written, 5 already there" in text, text
    check_output(out, 5, 2)
    assert not list((tmp_path / "bulk" / "manifest").glob(".*"))  # no temp file left where readers look


def test_bulk_job_to_s3_from_a_jsonl_spec_file(ray_local, tiny_model_dir, s3_endpoint, tmp_path):
    specs = tmp_path / "specs.jsonl"
    pose = np.eye(4).reshape(16).tolist()
    rows = [{"tour_id": f"t{i}", "prompt": f"a room {i}", "num_views": 3, "num_inference_steps": 2, "seed": i,
             "height": 16} for i in range(3)]
    rows.append({"tour_id": "posed", "prompts": ["a", "b"], "poses": [pose, pose[:3] + [1.0] + pose[4:]],
                 "num_inference_steps": 2, "height": 16})
    specs.write_text("\n".join(json.dumps(r) for r in rows))
    spec_uri = "s3://diffpano-test/specs/specs.jsonl"
    storage.write_bytes(spec_uri, specs.read_bytes())
    out = "s3://diffpano-test/bulk"
    code, text = bulk("--specs", spec_uri, "--out", out, "--model", str(tiny_model_dir))
    assert code == 0, text
    table = read_manifest(out).to_pandas()
    assert len(table) == 11 and set(table.height) == {16}
    assert table[table.tour_id == "posed"].sort_values("view_index").pose_c2w.iloc[1][3] == 1.0


def test_invalid_specs_are_refused_with_line_and_field_and_nothing_is_written(tiny_model_dir, tmp_path):
    specs = tmp_path / "specs.jsonl"
    specs.write_text("\n".join([
        json.dumps({"tour_id": "ok", "prompt": "a room"}),
        json.dumps({"tour_id": "bad id!", "prompt": "a room"}),
        json.dumps({"tour_id": "x", "prompt": "a room", "num_views": 99}),
        json.dumps({"tour_id": "ok", "prompt": "again"}),
        json.dumps({"tour_id": "y", "prompt": "a", "poses": [[2.0] + [0.0] * 15]}),
    ]))
    out = tmp_path / "out"
    code, text = bulk("--specs", str(specs), "--out", str(out), "--model", str(tiny_model_dir))
    assert code == 2
    for piece in ("line 2: tour_id", "line 3: num_views", "line 4: tour_id", "duplicate", "line 5", "poses"):
        assert piece in text, (piece, text)
    assert not out.exists()
    code, text = bulk("--specs", str(tmp_path / "missing.jsonl"), "--out", str(out))
    assert code == 2 and "--specs" in text and not out.exists()


def test_a_killed_job_reruns_to_every_tour_exactly_once(tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffpano.cli", "bulk", "--synthetic", "12", *TINY, "--out", str(out),
           "--model", str(tiny_model_dir), "--batch-size", "2"]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((out / "manifest").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    first = len(read_manifest(str(out)))
    assert first < 24, "the job finished before it could be killed"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    check_output(str(out), 12, 2)


def test_an_s3_outage_mid_job_loses_and_duplicates_nothing(ray_local, tiny_model_dir, s3_endpoint, s3_server):
    import threading

    out = "s3://diffpano-test/outage"

    def outage() -> None:
        deadline = time.monotonic() + 120
        while not storage.list_files(f"{out}/manifest", ".parquet") and time.monotonic() < deadline:
            time.sleep(0.2)
        s3_server.stop()
        stopped.append(time.monotonic())
        time.sleep(3)
        s3_server.start()

    stopped: list[float] = []
    thread = threading.Thread(target=outage)
    thread.start()
    code, text = bulk("--synthetic", "10", *TINY, "--out", out, "--model", str(tiny_model_dir), "--batch-size", "1")
    finished = time.monotonic()
    thread.join()
    assert stopped and stopped[0] < finished - 1  # the outage fell inside the job
    assert code == 0 and "10 tours / 20 views written" in text and "0 failed" in text, text  # retried, not lost
    check_output(out, 10, 2)


def parent(pid: int) -> int:
    """The parent PID of a process (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def writer_pids() -> list[int]:
    """PIDs of this test's bulk replicas: titled after the map_batches callable, children of the raylet this
    process started (other Ray clusters on the machine are left alone)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"MapBatches(TourWriter)" in cmdline.read_bytes():
                pid = int(cmdline.parent.name)
                if parent(parent(pid)) == os.getpid():
                    pids.append(pid)
        except OSError:
            continue
    return pids


def test_a_replica_that_dies_is_replaced_and_its_batch_retried(ray_local, tiny_model_dir, tmp_path):
    import threading

    out = tmp_path / "replica-killed"
    killed: list[int] = []

    def kill_a_replica() -> None:
        deadline = time.monotonic() + 120
        while not list((out / "manifest").glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in writer_pids()[:1]:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=kill_a_replica)
    thread.start()
    code, text = bulk("--synthetic", "12", "--steps", "6", "--views", "2", "--out", str(out), "--model",
                      str(tiny_model_dir), "--batch-size", "2")
    thread.join()
    assert killed, "no replica was found to kill"
    assert code == 0 and "12 tours / 24 views written" in text and "0 failed" in text, text
    check_output(str(out), 12, 2)
