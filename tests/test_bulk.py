"""Offline bulk jobs on local Ray: tours (docs/tours.md) locally and on S3, exactly once, bad specs refused."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import check_output, plain, wait_until
from PIL import Image
from tiny_sd import with_scheduler_class
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.io import storage
from diffpano.io.manifest import manifest_lock, read_manifest, read_tours
from diffpano.specs import synthetic_specs

app = build_app()

TINY = ["--steps", "2", "--views", "2"]


pytestmark = pytest.mark.ray  # bulk jobs, dataset builds and training run on Ray here


def bulk(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["bulk", *args])
    return result.exit_code, plain(result.output)


def test_bulk_job_to_a_local_folder_then_compaction_and_a_rerun_add_nothing(ray_local, tiny_model_dir, tmp_path):
    out = str(tmp_path / "bulk")
    code, text = bulk("--synthetic", "5", *TINY, "--out", out, "--model", str(tiny_model_dir), "--batch-size", "2")
    assert code == 0, text
    assert "5 tours / 10 views written" in text and "0 failed" in text
    check_output(out, 5, 2)
    # Each view keeps its own caption, pose and the tour's seed from the synthetic specs (walks through scenes).
    table = read_manifest(out).to_pandas().sort_values(["tour_id", "view_index"])
    specs = list(synthetic_specs(5, views=2, seed=0, steps=2))
    expected = [(s["tour_id"], v, s["prompts"][v], s["seed"]) for s in specs for v in range(2)]
    assert list(zip(table.tour_id, table.view_index, table.prompt, table.seed, strict=True)) == expected
    np.testing.assert_allclose(np.stack(table.pose_c2w), [p for s in specs for p in s["poses"]], atol=1e-6)
    assert set(table.num_inference_steps) == {2} and set(table.scheduler) == {"ddim"}  # the tiny model's own
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


def test_an_s3_job_publishes_few_parts_as_it_runs_and_readers_see_whole_tours_once(ray_local, tiny_model_dir,
                                                                                   s3_endpoint, monkeypatch):
    """Batches stage their parts; every 4 the job publishes them merged (one PUT), so 16 batches end in at most
    5 parts, not 16. A reader polling the manifest meanwhile sees tours appear, each whole and once."""
    import batch.bulk

    monkeypatch.setattr(batch.bulk, "PUBLISH_S", 1e9)  # publish by count alone: the part count is then exact
    out, reads, stop = "s3://diffpano-test/merged", [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            table = read_manifest(out).to_pandas()
            views = table.groupby("tour_id").size()
            reads.append((len(table), int(table.duplicated(["tour_id", "view_index"]).sum()), int((views != 2).sum())))
            time.sleep(0.05)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        code, text = bulk("--synthetic", "16", *TINY, "--out", out, "--model", str(tiny_model_dir), "--batch-size",
                          "1", "--compact-every", "4")
    finally:
        stop.set()
        thread.join()
    assert code == 0 and "16 tours / 32 views written" in text, text
    check_output(out, 16, 2)
    assert 2 <= len(storage.list_files(f"{out}/manifest", ".parquet")) <= 5
    assert not storage.list_files(f"{out}/_pending")
    assert all(dup == 0 and partial == 0 for _, dup, partial in reads), reads  # never a duplicate or partial tour
    assert any(0 < rows < 32 for rows, _, _ in reads), reads  # tours became visible while the job ran

    resumed = "s3://diffpano-test/merged-stopped"  # what a job killed before publishing leaves: staged parts
    storage.copy_tree(f"{out}/images", f"{resumed}/images")
    storage.copy_tree(f"{out}/manifest", f"{resumed}/_pending")
    code, text = bulk("--synthetic", "16", *TINY, "--out", resumed, "--model", str(tiny_model_dir))
    assert code == 0 and "0 tours / 0 views written, 16 already there" in text, text  # published, not redone
    check_output(resumed, 16, 2)
    assert not storage.list_files(f"{resumed}/_pending")


def test_a_bulk_spec_starts_its_tour_from_a_given_panorama(ray_local, tiny_model_dir, tmp_path):
    """images {"1": path} in a JSONL spec: the tour's view 1 is that panorama; a spec naming a missing file fails
    alone, recorded in failures/ with the field."""
    given = np.random.default_rng(4).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    Image.fromarray(given).save(tmp_path / "given.png")
    rows = [{"tour_id": "given", "prompt": "a room", "num_views": 2, "num_inference_steps": 2, "height": 16,
             "images": {"1": str(tmp_path / "given.png")}},
            {"tour_id": "missing", "prompt": "a room", "num_views": 2, "num_inference_steps": 2, "height": 16,
             "images": {"0": str(tmp_path / "missing.png")}}]
    (tmp_path / "specs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code, text = bulk("--specs", str(tmp_path / "specs.jsonl"), "--out", str(out), "--model", str(tiny_model_dir))
    assert code == 0 and "1 tours / 2 views written" in text and "1 failed" in text, text
    [tour] = read_tours(str(out), ["given"])
    assert np.array_equal(tour.images[1], given)
    failures = "".join(p.read_text() for p in (out / "failures").glob("*.jsonl"))
    assert "missing" in failures and "images.0: there is no file" in failures


def test_bulk_specs_name_loras_under_a_root_and_lora_sets_the_rest(ray_local, tiny_model_dir, lora_root, tmp_path):
    """One replica, one batch: tours with warm, with cool (--lora for the spec naming none) and a missing LoRA (it
    fails alone); the manifest records which LoRA made each tour, and generating again without LoRAs differs."""
    base = {"prompt": "a room", "num_views": 2, "num_inference_steps": 2, "seed": 1}
    rows = [base | {"tour_id": "warm", "lora": "warm"}, base | {"tour_id": "cool"},
            base | {"tour_id": "gone", "lora": "gone"}, base | {"tour_id": "plain", "lora": "warm"}]
    (tmp_path / "specs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code, text = bulk("--specs", str(tmp_path / "specs.jsonl"), "--out", str(out), "--model", str(tiny_model_dir),
                      "--lora-root", str(lora_root), "--lora", "cool", "--replicas", "1")
    assert code == 0 and "3 tours / 6 views written" in text and "1 failed" in text, text
    tours = {t.tour_id: t for t in read_tours(str(out))}
    assert {k: t.model.rsplit("+", 1)[-1] for k, t in tours.items()} == {"warm": "lora:warm", "cool": "lora:cool",
                                                                        "plain": "lora:warm"}
    assert np.array_equal(tours["warm"].images, tours["plain"].images)  # same spec, same LoRA, same tour
    assert not np.array_equal(tours["warm"].images, tours["cool"].images)
    failures = "".join(p.read_text() for p in (out / "failures").glob("*.jsonl"))
    assert "gone" in failures and "no pytorch_lora_weights.safetensors" in failures


def test_bulk_specs_make_tours_on_a_layout_or_a_mesh_with_their_depth(ray_local, tiny_model_dir, tmp_path):
    """layout and mesh_uri at strength 0 give the proxy's renders (the geometry is what was asked for), with depth
    files in the manifest; a missing mesh fails its tour alone, naming mesh_uri."""
    from mesh_rooms import write_glb

    from diffpano.data.proxy import layout_proxy, mesh_proxy

    glb = write_glb(tmp_path / "rooms.glb")
    base = {"num_views": 2, "num_inference_steps": 2, "seed": 3, "height": 16, "strength": 0.0}
    rows = [base | {"tour_id": "laid", "prompt": "a kitchen with green walls", "layout": True},
            base | {"tour_id": "scan", "prompt": "a loft", "mesh_uri": str(glb)},
            base | {"tour_id": "gone", "prompt": "a loft", "mesh_uri": str(tmp_path / "gone.glb")}]
    (tmp_path / "specs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code, text = bulk("--specs", str(tmp_path / "specs.jsonl"), "--out", str(out), "--model", str(tiny_model_dir))
    assert code == 0 and "2 tours / 4 views written" in text and "1 failed" in text, text
    tours = {t.tour_id: t for t in read_tours(str(out))}
    for tid, proxy in (("laid", layout_proxy(3, 16, 32, 2, 1.0, "kitchen", "green")),
                       ("scan", mesh_proxy(str(glb), 16, 32, 2, None, 1.0, 3))):
        assert np.array_equal(tours[tid].images, proxy.rgb) and np.allclose(tours[tid].poses, proxy.poses), tid
        assert np.abs(tours[tid].depths - proxy.depth).max() <= 0.0006, tid
    failures = "".join(p.read_text() for p in (out / "failures").glob("*.jsonl"))
    assert "gone" in failures and "mesh_uri: there is no file" in failures


def test_a_model_naming_a_scheduler_diffusers_lacks_is_refused_and_runs_with_scheduler(ray_local, tiny_model_dir,
                                                                                        tmp_path):
    model = with_scheduler_class(tiny_model_dir, tmp_path / "renamed", "PLMSv9Scheduler")
    code, text = bulk("--synthetic", "2", *TINY, "--out", str(tmp_path / "refused"), "--model", str(model))
    assert code == 2 and "PLMSv9Scheduler" in text and "--scheduler" in text
    assert not (tmp_path / "refused").exists()
    out = str(tmp_path / "pndm")
    code, text = bulk("--synthetic", "2", *TINY, "--out", out, "--model", str(model), "--scheduler", "pndm")
    assert code == 0, text
    assert set(read_manifest(out).column("scheduler").to_pylist()) == {"pndm"}


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



def waiting_to_publish(out: Path) -> set[int]:
    """PIDs of the processes blocked on the manifest lock of a local output (/proc/locks marks waiters with '->'):
    replicas whose batch is generated and whose images are written, waiting to publish the batch's manifest part."""
    lock = Path(manifest_lock(str(out)))
    if not lock.exists():
        return set()
    inode = lock.stat().st_ino
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:
            kind, _, _, pid, device = fields[fields.index("->") + 1 : fields.index("->") + 6]
            if kind == "FLOCK" and int(device.rsplit(":", 1)[1]) == inode:
                pids.add(int(pid))
    return pids


def session_members(sid: int) -> list[int]:
    """PIDs of the live processes of a session (those a process started with start_new_session=True and their
    descendants, which stay in its session although Ray puts its workers in process groups of their own)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session."""
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # over a minute: make test-slow
def test_a_killed_job_reruns_to_every_tour_exactly_once(ray_local, tiny_model_dir, tmp_path):
    """A job killed (SIGKILL to the driver and every Ray process it started) while publishing, over an output that an
    earlier job half filled, reruns to every tour exactly once. The kill lands mid-job by construction, not by timing:
    the test holds the output's manifest lock (as a compaction does), so the job can write images but publish no
    part, and it is killed once one of its replicas is seen waiting to publish."""
    out = tmp_path / "killed"
    code, text = bulk("--synthetic", "4", *TINY, "--out", str(out), "--model", str(tiny_model_dir),
                      "--batch-size", "2")
    assert code == 0 and "4 tours / 8 views written" in text, text
    cmd = [sys.executable, "-m", "diffpano.cli", "bulk", "--synthetic", "12", *TINY, "--out", str(out),
           "--model", str(tiny_model_dir), "--batch-size", "2"]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    with storage.local_lock(manifest_lock(str(out)), exclusive=True):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_until(lambda: waiting_to_publish(out) or proc.poll() is not None, "a replica waiting to publish")
            assert proc.poll() is None, "the job ended instead of waiting to publish"
        finally:
            kill_session(proc.pid)  # the driver and every Ray process it started, replicas waiting on the lock too
            proc.wait()
            wait_until(lambda: not session_members(proc.pid), "every process of the killed job to be gone", 60)
    assert len(read_manifest(str(out))) == 8  # the earlier job's 4 tours; the killed one published nothing
    assert len(list((out / "images").iterdir())) > 4  # but it had written images of tours it never published
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "8 tours / 16 views written, 4 already there" in plain(done.stdout + done.stderr), done.stdout[-2000:]
    check_output(str(out), 12, 2)


class FlakyProxy:
    """A TCP proxy to the S3 server that has one outage mid-job, placed by what the job does rather than by a clock.

    It forwards connections until the `nth` request to PUT a key under `prefix` (a staged part), then goes down:
    that request is not forwarded, the open connections are cut, and the next `refuse` connections are reset as they
    arrive, as by a server that died. Then it forwards again (the S3 server itself was never touched).
    """

    def __init__(self, upstream: str, prefix: bytes, nth: int, refuse: int) -> None:
        import socket
        import threading

        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.pattern = re.compile(rb"PUT /" + re.escape(prefix))
        self.nth, self.refuse = nth, refuse
        self.puts = self.refused = self.outages = 0
        self.down = False
        self.lock = threading.Lock()
        self.open: set = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self.down:
                    self.refused += 1
                    self.down = self.refused < self.refuse
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()  # a reset
                    continue
                upstream = socket.create_connection(self.upstream)
                self.open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, requests: bool) -> None:
        """Copy src to dst; on the client side, watch the request lines for the PUT that starts the outage."""
        tail = b""
        try:
            while data := src.recv(65536):
                if requests:
                    seen = tail + data
                    starts = [m for m in self.pattern.finditer(seen) if m.end() > len(tail)]
                    tail = seen[-200:]
                    if starts and self._count(len(starts)):
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(2)

    def _count(self, puts: int) -> bool:
        """Count PUTs under the prefix; True (and the outage begins, cutting every connection) at the nth."""
        with self.lock:
            before, self.puts = self.puts, self.puts + puts
            if not before < self.nth <= self.puts:
                return False
            self.down, self.outages = True, self.outages + 1
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(2)
            self.open.clear()
            return True

    def close(self) -> None:
        self.listener.close()


def test_an_s3_outage_mid_job_loses_and_duplicates_nothing(ray_local, tiny_model_dir, s3_endpoint, monkeypatch):
    """The S3 endpoint goes down as the job stages its second manifest part (one part stored, nine to go) and
    stays down for three connection attempts; the job retries through it and ends with every tour exactly once."""
    out = "s3://diffpano-test/outage"
    proxy = FlakyProxy(s3_endpoint, b"diffpano-test/outage/_pending/", nth=2, refuse=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # this process and (through worker_env) the replicas
    try:
        code, text = bulk("--synthetic", "10", *TINY, "--out", out, "--model", str(tiny_model_dir),
                          "--batch-size", "1")
    finally:
        proxy.close()
    assert proxy.outages == 1 and proxy.refused == 3, (proxy.outages, proxy.refused)  # the outage hit the job
    assert code == 0 and "10 tours / 20 views written" in text and "0 failed" in text, text  # retried, not lost
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    check_output(out, 10, 2)


def test_a_replica_that_dies_is_replaced_and_its_batch_retried(ray_local, tiny_model_dir, tmp_path):
    """A replica is killed (SIGKILL) while it holds a generated batch it has not published: the test holds the
    manifest lock until a replica waits on it, kills that one, then lets go. The restarted replica redoes the batch."""
    import threading

    out = tmp_path / "replica-killed"
    result: list[tuple[int, str]] = []
    job = threading.Thread(target=lambda: result.append(bulk(
        "--synthetic", "12", "--steps", "6", "--views", "2", "--out", str(out), "--model", str(tiny_model_dir),
        "--batch-size", "2")))
    with storage.local_lock(manifest_lock(str(out)), exclusive=True):
        job.start()
        pid = min(wait_until(lambda: waiting_to_publish(out), "a replica waiting to publish"))
        assert b"TourWriter" in Path(f"/proc/{pid}/cmdline").read_bytes()  # one of this job's replicas
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pid not in waiting_to_publish(out), "the killed replica to let go of the lock")
        assert not read_manifest(str(out)).num_rows  # nothing was published before the kill
    job.join()
    code, text = result[0]
    assert code == 0 and "12 tours / 24 views written" in text and "0 failed" in text, text
    check_output(str(out), 12, 2)


def test_a_job_the_cluster_has_no_room_for_stops_with_exit_code_3_and_resumes(ray_local, tiny_model_dir, tmp_path):
    """Replicas asking for more CPUs than the cluster has never start: the job stops after --stall-timeout with a
    message instead of hanging, writes nothing, and the same command with room finishes the job."""
    out = str(tmp_path / "stalled")
    args = ["--synthetic", "2", *TINY, "--out", out, "--model", str(tiny_model_dir), "--batch-size", "2"]
    code, text = bulk(*args, "--cpus-per-replica", "64", "--stall-timeout", "3")
    assert code == 3 and "bulk stopped: no actor answered for 3s" in text and "run the same command again" in text
    assert not (tmp_path / "stalled" / "manifest").exists()
    code, text = bulk(*args)
    assert code == 0 and "2 tours / 4 views written" in text, text


def test_a_local_manifest_is_compacted_as_the_job_runs_and_stays_exactly_once(ray_local, tiny_model_dir, tmp_path):
    """Seven one-tour parts with a compaction every two (a task beside the job's loop, one at a time): the manifest
    ends with merged parts and few small ones, not seven, and readers see every tour once."""
    out = tmp_path / "compacting"
    code, text = bulk("--synthetic", "7", *TINY, "--out", str(out), "--model", str(tiny_model_dir),
                      "--batch-size", "1", "--compact-every", "2")
    assert code == 0 and "7 tours / 14 views written" in text, text
    names = sorted(p.name for p in (out / "manifest").glob("*.parquet"))
    compacted = [n for n in names if n.startswith("part-compacted-")]
    assert compacted and len(names) < 7, names
    check_output(str(out), 7, 2)
    code, text = bulk("--synthetic", "7", *TINY, "--out", str(out), "--model", str(tiny_model_dir))
    assert code == 0 and "7 already there" in text, text
