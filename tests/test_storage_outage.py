"""Storage outages (the real S3 endpoint on loopback, stopped and started again): waited out up to a bound, then a
clean, resumable stop."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time

import boto3
import pyarrow.parquet as pq
import pytest
from helpers import check_output, plain, wait_until

from diffpano.io import storage
from diffpano.io.storage import StorageUnavailable

BUCKET = "s3://diffpano-test"
TINY = ["--views", "2", "--steps", "10", "--batch-size", "2", "--replicas", "1"]  # about 6 s a batch on 2 cores


@pytest.fixture
def wait_s(monkeypatch):
    """Set this process's outage wait (DIFFPANO_STORAGE_WAIT_S) for one test."""
    return lambda seconds: monkeypatch.setenv(storage.WAIT_ENV, str(seconds))


def restart_after(server, seconds: float) -> threading.Thread:
    """Start the stopped S3 server again after `seconds`, from another thread."""
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()))
    thread.start()
    return thread


def test_a_read_waits_out_an_outage_and_says_so(s3_endpoint, s3_server, wait_s):
    storage.write_bytes(f"{BUCKET}/outage/a", b"kept")
    wait_s(60)
    heard = []
    remove = storage.on_outage(lambda waited, err: heard.append(waited))
    s3_server.stop()
    started = time.monotonic()
    thread = restart_after(s3_server, 3.0)
    try:
        assert storage.read_bytes(f"{BUCKET}/outage/a") == b"kept"
    finally:
        thread.join()
        remove()
    assert 3.0 <= time.monotonic() - started < 20
    assert heard and heard == sorted(heard)  # told before each retry, with the time waited so far


def test_past_the_bound_an_outage_is_storage_unavailable_naming_the_limit(s3_endpoint, s3_server, wait_s):
    wait_s(2)
    s3_server.stop()
    started = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable, match=r"storage unavailable for \d+s .*DIFFPANO_STORAGE_WAIT_S.* 2s"):
            storage.write_bytes(f"{BUCKET}/outage/b", b"x")
    finally:
        s3_server.start()
    assert time.monotonic() - started < 10
    assert not storage.exists(f"{BUCKET}/outage/b")


def test_a_request_waits_out_no_outage_even_in_the_thread_it_hands_storage_to(s3_endpoint, s3_server, wait_s):
    """What the HTTP API does (serve.ingress.storage_errors): 503 at once, while jobs of the same process wait."""
    import asyncio

    wait_s(60)

    async def request() -> float:
        started = time.monotonic()
        with storage.wait_at_most(0), pytest.raises(StorageUnavailable):
            await asyncio.to_thread(storage.read_bytes, f"{BUCKET}/outage/c")
        return time.monotonic() - started

    s3_server.stop()
    try:
        assert asyncio.run(request()) < 5
        assert storage.storage_wait_s() == 60  # outside the block: the process's own bound
    finally:
        s3_server.start()


def test_a_missing_object_is_not_an_outage(s3_endpoint, wait_s):
    wait_s(60)
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{BUCKET}/outage/missing")
    assert time.monotonic() - started < 5


def test_a_bad_wait_setting_names_the_variable(wait_s):
    wait_s("nan")
    with pytest.raises(ValueError, match="DIFFPANO_STORAGE_WAIT_S: expected a finite number"):
        storage.storage_wait_s()


def tours_stored(prefix: str) -> int:
    """Tours in the manifest parts under an s3 prefix of the test bucket, staged or published (read with boto3, not
    the code under test)."""
    client, ids = boto3.client("s3"), set()
    for folder in ("_pending", "manifest"):
        listing = client.list_objects_v2(Bucket="diffpano-test", Prefix=f"{prefix}/{folder}/")
        for item in listing.get("Contents", []):
            body = client.get_object(Bucket="diffpano-test", Key=item["Key"])["Body"].read()
            ids |= set(pq.read_table(io.BytesIO(body), columns=["tour_id"]).column("tour_id").to_pylist())
    return len(ids)


def start_bulk(model_dir, prefix: str, *args: str) -> subprocess.Popen:
    """A 6-tour bulk job writing under an s3 prefix of the test bucket, started in a process of its own."""
    cmd = [sys.executable, "-m", "diffpano.cli", "bulk", "--synthetic", "6", *TINY, "--model", str(model_dir),
           "--out", f"{BUCKET}/{prefix}", *args]
    return subprocess.Popen(cmd, env=os.environ | {"RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


@pytest.mark.ray
def test_a_bulk_job_waits_out_an_outage_and_completes_exactly_once(s3_endpoint, s3_server, tiny_model_dir):
    proc = start_bulk(tiny_model_dir, "outage-job")
    try:
        wait_until(lambda: tours_stored("outage-job") >= 1 or proc.poll() is not None, "a first batch", 300)
        s3_server.stop()
        restart_after(s3_server, 12.0).join()
        text = plain(proc.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert "storage unavailable, retrying" in text, text[-3000:]  # the bar said why it waited
    assert "6 tours / 12 views written" in text and "0 failed" in text, text[-3000:]
    check_output(f"{BUCKET}/outage-job", 6, 2, with_ray=False)


@pytest.mark.ray
def test_an_outage_past_storage_wait_stops_cleanly_and_the_same_command_resumes(s3_endpoint, s3_server,
                                                                                tiny_model_dir):
    proc = start_bulk(tiny_model_dir, "outage-stop", "--storage-wait", "3")
    try:
        wait_until(lambda: tours_stored("outage-stop") >= 1 or proc.poll() is not None, "a first batch", 300)
        s3_server.stop()
        text = plain(proc.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        proc.kill()
        s3_server.start()
    assert proc.returncode == 3, text[-3000:]
    assert "bulk stopped: storage unavailable for" in text and "run the same command again" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    written = tours_stored("outage-stop")
    assert 2 <= written < 6  # stopped mid-job: some batches stored (staged, the first ones), not all

    again = start_bulk(tiny_model_dir, "outage-stop", "--storage-wait", "3")
    text = plain(again.communicate(timeout=300)[0].decode(errors="replace"))
    assert again.returncode == 0, text[-3000:]
    assert f"{written} already there" in text and "0 failed" in text, text[-3000:]  # published, not redone
    check_output(f"{BUCKET}/outage-stop", 6, 2, with_ray=False)
