"""How a bulk job's cost grows with its size and its cluster: per-tour driver overhead, driver memory, manifest parts
and resume time at 100, 1,000 and 10,000 tours; driver memory for 100,000 specs; tours/h on 1, 2 and 3 nodes; the
same on S3 (moto's server in a process of its own) with one part per batch (--compact-every 0, as before S3 parts
were merged) and with the parts published merged as the job runs, and what a reader then pays to open the manifest.

The tours are the tiny random model's (1 view, 1 step, 16x32), so that the job's own machinery, not the model, is
what is measured (after a warm-up job that starts Ray). Driver overhead is the driver process's CPU time per tour
(its Ray core worker included; replicas, raylet and GCS are other processes). Goal: per-tour overhead at the largest
size within 1.2x the middle. Tours/h on 1..3 nodes use heavier tours (2 views, 10 steps) on a cluster of Ray's
multi-node harness grown a node at a time.
Run: python bench/bulk_scale.py [--sizes 100,1000,10000] [--memory-specs 100000] [--nodes 3] [--s3-tours 2000]
[--json PATH] (an empty --sizes, --memory-specs 0, --nodes 0 or --s3-tours 0 leaves that part out)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # Ray's multi-node harness, as the tests drive it

from common import _proc_status_kb, format_table, goal_line, write_json  # noqa: E402

from diffpano.defaults import COMPACT_EVERY  # noqa: E402

SPEC = {"num_inference_steps": 1, "height": 16, "width": 32, "num_views": 1}


def write_specs(path: Path, count: int, views: int = 1, steps: int = 1) -> Path:
    """A JSONL file of count tiny specs (views poses and prompts each when views > 1)."""
    pose = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    with open(path, "w") as f:
        for i in range(count):
            row = {"tour_id": f"t{i:07d}", "seed": i} | SPEC | {"num_inference_steps": steps}
            if views > 1:
                row |= {"num_views": views, "prompts": [f"a bright room {i} view {v}" for v in range(views)],
                        "poses": [pose] * views}
            else:
                row["prompt"] = f"a bright room {i}"
            f.write(json.dumps(row) + "\n")
    return path


def tiny_model(work: Path) -> str:
    """The tiny random model saved as a model directory."""
    from diffpano.pipelines.factory import build_tiny_pipeline
    from diffpano.pipelines.loading import save_model

    path = work / "tiny"
    save_model(build_tiny_pipeline(latent=False, seed=0), str(path))
    return str(path)


def job(specs_path: Path, out: str, model: str, compact_every: int = COMPACT_EVERY) -> dict:
    """Wall, driver CPU and driver peak memory growth of one job, its manifest parts, the time to read its whole
    manifest, then a re-run (resume check)."""
    from batch.bulk import run_bulk
    from diffpano.io import storage
    from diffpano.io.manifest import read_manifest
    from diffpano.specs import SpecRows, iter_spec_rows

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss, cpu, wall = _proc_status_kb("VmRSS"), time.process_time(), time.perf_counter()
    summary = run_bulk(SpecRows(lambda: iter_spec_rows(str(specs_path))), out, model, replicas=2,
                       batch_size=4, progress=False, compact_every=compact_every)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (_proc_status_kb("VmHWM") - rss) / 1024
    assert summary.tours_done == summary.tours_total and not summary.failures, summary.line()
    parts = len(storage.list_files(storage.join(out, "manifest"), ".parquet"))
    read = time.perf_counter()
    assert read_manifest(out).num_rows == summary.views_done
    read = time.perf_counter() - read
    resumed = time.perf_counter()
    again = run_bulk(SpecRows(lambda: iter_spec_rows(str(specs_path))), out, model, progress=False)
    assert again.tours_done == 0 and again.tours_skipped == summary.tours_total, again.line()
    tours = summary.tours_total
    return {"tours": tours, "wall_s": wall, "driver_cpu_s": cpu, "driver_cpu_ms_per_tour": cpu / tours * 1e3,
            "wall_ms_per_tour": wall / tours * 1e3, "driver_peak_growth_mb": peak, "parts": parts,
            "compactions": summary.compactions, "read_s": read, "resume_s": time.perf_counter() - resumed}


MEMORY_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {bench!r}); sys.path.insert(0, {root!r})
from common import _proc_status_kb
from diffpano.specs import SpecRows, iter_spec_rows, read_spec_rows, validate_specs
base = _proc_status_kb("VmRSS"); started = time.perf_counter()
if {streamed}:
    specs = SpecRows(lambda: iter_spec_rows({path!r}))
    count = sum(1 for _ in specs.json_rows())  # the generation pass: the file read again, a chunk at a time
else:
    specs, _ = validate_specs(read_spec_rows({path!r}))  # what the driver held before (all specs at once)
    count = len(specs)
print(count, (_proc_status_kb("VmHWM") - base) / 1024, time.perf_counter() - started)
"""


def spec_memory(path: Path, streamed: bool) -> dict:
    """Peak memory growth of a fresh process that reads and checks a spec file as the driver does."""
    script = MEMORY_SCRIPT.format(bench=str(ROOT / "bench"), root=str(ROOT), path=str(path), streamed=streamed)
    count, peak, seconds = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                          text=True).stdout.split()
    return {"specs": int(count), "peak_growth_mb": float(peak), "seconds": float(seconds)}


def node_rates(specs_path: Path, model: str, work: Path, nodes: int) -> list[dict]:
    """Tours/h of the same job on a cluster of 1..nodes worker nodes (one CPU, one replica each), grown in place."""
    from helpers import multinode_cluster

    rows = []
    with multinode_cluster(1) as (cluster, _):
        for n in range(1, nodes + 1):
            if n > 1:
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
            out = work / f"nodes{n}"
            cmd = [sys.executable, "-m", "diffpano.cli", "bulk", "--specs", str(specs_path), "--out", str(out),
                   "--model", model, "--replicas", str(n), "--batch-size", "4"]
            env = os.environ | {"RAY_ADDRESS": cluster.address}
            text = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=True).stdout
            line = next(x for x in text.splitlines() if x.startswith("bulk "))
            rows.append({"nodes": n, "tours_per_hour": float(line.split("(")[-1].split()[0]), "summary": line})
    return rows


@contextmanager
def s3_endpoint() -> Iterator[None]:
    """moto's S3 server on a loopback port, in a process of its own (so its CPU is not the driver's), with a bucket
    `bench`; the AWS variables of this process (and so of the replicas) point at it meanwhile."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield
    finally:
        server.terminate()
        server.wait(30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def s3_jobs(specs_path: Path, model: str) -> list[dict]:
    """The same job to S3 with a manifest part per batch (--compact-every 0, as before) and with its parts merged."""
    rows = []
    with s3_endpoint():
        for how, every in (("a part per batch", 0), ("merged as the job runs", COMPACT_EVERY)):
            rows.append({"how": how} | job(specs_path, f"s3://bench/every{every}", model, every))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    """Measure and print the three tables and the goal line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--memory-specs", type=int, default=100_000)
    parser.add_argument("--node-tours", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--s3-tours", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="diffpano-bench-scale-"))
    model = tiny_model(work)
    results: dict = {"sizes": [], "memory": {}, "nodes": [], "s3": []}
    if args.sizes or args.s3_tours:
        job(write_specs(work / "warmup.jsonl", 8), str(work / "warmup"), model)  # Ray's start and imports, unmeasured
    for size in [int(s) for s in args.sizes.split(",") if s]:
        results["sizes"].append(job(write_specs(work / f"specs{size}.jsonl", size), str(work / f"out{size}"), model))
        print(json.dumps(results["sizes"][-1]), flush=True)
    if args.memory_specs:
        big = write_specs(work / "specs-memory.jsonl", args.memory_specs, views=4)
        results["memory"] = {"streamed": spec_memory(big, True), "all_at_once": spec_memory(big, False),
                             "file_mb": big.stat().st_size / 2**20}
    if args.s3_tours:
        results["s3"] = s3_jobs(write_specs(work / "specs-s3.jsonl", args.s3_tours), model)
    if args.nodes:  # 2-view, 10-step tours (~3 s on one core): the replicas' start is a small share of the job
        specs = write_specs(work / "specs-nodes.jsonl", args.node_tours, views=2, steps=10)
        results["nodes"] = node_rates(specs, model, work, args.nodes)
    report(results)
    write_json(args.json, results)


def report(results: dict) -> None:
    """The tables and the goal line."""
    sizes = results["sizes"]
    if sizes:
        print(format_table(["tours", "wall s", "wall ms/tour", "driver CPU ms/tour", "driver peak MB", "parts",
                            "resume s"],
                           [[r["tours"], f"{r['wall_s']:.1f}", f"{r['wall_ms_per_tour']:.1f}",
                             f"{r['driver_cpu_ms_per_tour']:.2f}", f"{r['driver_peak_growth_mb']:.1f}", r["parts"],
                             f"{r['resume_s']:.2f}"] for r in sizes]))
    memory = results["memory"]
    if memory:
        print(format_table(["specs (4 views)", "driver holds", "peak growth MB", "s"],
                           [[memory[k]["specs"], k.replace("_", " "), f"{memory[k]['peak_growth_mb']:.0f}",
                             f"{memory[k]['seconds']:.1f}"] for k in ("all_at_once", "streamed")]))
    if results["nodes"]:
        base = results["nodes"][0]["tours_per_hour"]
        print(format_table(["nodes", "tours/h", "vs 1 node"], [[r["nodes"], f"{r['tours_per_hour']:.0f}",
                                                               f"{r['tours_per_hour'] / base:.2f}x"]
                                                              for r in results["nodes"]]))
    if results["s3"]:
        print(format_table(["S3 manifest", "tours", "wall s", "driver CPU ms/tour", "parts", "read manifest s",
                            "resume s"],
                           [[r["how"], r["tours"], f"{r['wall_s']:.1f}", f"{r['driver_cpu_ms_per_tour']:.2f}",
                             r["parts"], f"{r['read_s']:.2f}", f"{r['resume_s']:.2f}"] for r in results["s3"]]))
    if len(sizes) >= 2:
        ratio = sizes[-1]["driver_cpu_ms_per_tour"] / sizes[-2]["driver_cpu_ms_per_tour"]
        print(goal_line(f"driver overhead per tour at {sizes[-1]['tours']} tours {ratio:.2f}x that at "
                        f"{sizes[-2]['tours']} (<= 1.2x)", ratio <= 1.2))


if __name__ == "__main__":
    main()
