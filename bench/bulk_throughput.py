"""Bulk generation throughput: tours/hour offline (actor pool) with 1 and 2 replicas, and online (Serve), same specs.

Cases: 1 replica x 1 CPU and 2 replicas x 1 CPU (the scaling pair: on this 2-core machine the cores allow exactly
that), and 1 replica x 2 CPUs (what `make run` uses) against the same job online.

The share of time outside the model is 1 - (model seconds / replicas) / wall seconds, where model seconds are the
replicas' time inside the pipeline (generation + PNG encoding excluded) summed over batches.
Goals: 2 replicas >= 1.8x one when the cores allow it; outside-model share <= 5% at batch size >= 4.
Run: python bench/bulk_throughput.py [--model DIR] [--tours 16] [--views 4] [--steps 10] [--json PATH]
     python bench/bulk_throughput.py --single [--cpus 2] [--gpus 1]   (one case: 1 replica, offline, on a GPU)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from common import format_table, free_port, goal_line, write_json  # noqa: E402

from batch.bulk import run_bulk  # noqa: E402
from batch.client import run_online  # noqa: E402
from diffpano.specs import synthetic_specs, validate_specs  # noqa: E402


def online(model: str | None, specs, work: Path) -> float:
    """Wall seconds of the same job through a Serve app with one model replica on 2 CPUs."""
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    deployments = [{"name": "DiffPanoAPI", "ray_actor_options": {"num_cpus": 0}},
                   {"name": "PanoGenerator", "ray_actor_options": {"num_cpus": 2}, "max_queued_requests": 64,
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}]
    serve.run(build_app({"model": model, "output_root": str(work / "served"), "job_concurrency": 4,
                         "max_batch_views": 16}, deployments), name="bulkbench", route_prefix="/", blocking=False)
    started = time.perf_counter()
    status = run_online(f"http://127.0.0.1:{port}", specs, "job", progress=False, poll_s=0.2)
    wall = time.perf_counter() - started
    serve.shutdown()
    assert status["state"] == "done", status
    return wall


def offline(specs, work: Path, model: str | None, replicas: int, cpus: float, batch_size: int,
            gpus: float = 0.0) -> tuple[str, dict, list]:
    """(name, results, table row) of one offline job: tours/hour, wall seconds and the outside-model share."""
    name = f"offline_{replicas}x{cpus:g}cpu" + (f"_{gpus:g}gpu" if gpus else "")
    summary = run_bulk(specs, str(work / name), model, replicas=replicas,
                       batch_size=min(batch_size, max(1, len(specs) // replicas)), num_gpus=gpus,
                       cpus_per_replica=cpus, progress=False)
    outside = 1 - (summary.model_seconds / replicas) / summary.seconds
    rate = summary.tours_done / summary.seconds * 3600
    gpu = f" + {gpus:g} GPU" if gpus else ""
    row = [f"offline (actor pool), {replicas} replica(s) x {cpus:g} CPU{gpu}", f"{rate:.0f}", f"{summary.seconds:.1f}",
           f"{outside:.1%}"]
    return name, {"tours_per_hour": rate, "wall_s": summary.seconds, "outside_model_share": outside,
                  "tours_done": summary.tours_done, "failures": len(summary.failures)}, row


def main() -> None:
    """Offline with 1 and 2 replicas, then online (or --single: one offline case); print tours/hour and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--tours", type=int, default=16)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--single", action="store_true", help="only one case: 1 replica offline (--cpus, --gpus)")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of the --single replica (2)")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs of the --single replica (0)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    specs, _ = validate_specs(synthetic_specs(args.tours, args.views, seed=7, steps=args.steps))
    work = Path(tempfile.mkdtemp(prefix="diffpano-bench-bulk-"))
    if args.single:
        ray.init(num_cpus=max(2, math.ceil(args.cpus)), num_gpus=math.ceil(args.gpus), include_dashboard=False,
                 log_to_driver=False)
        name, result, row = offline(specs, work, args.model, 1, args.cpus, args.batch_size, args.gpus)
        print(format_table(["path", "tours/hour", "wall s", "outside model"], [row]))
        write_json(args.json, {"tours": args.tours, "views": args.views, "steps": args.steps,
                               "results": {name: result}})
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results, rows = {}, []
    # (replicas, CPUs each): the scaling pair gives every replica the same single core; the last is `make run`'s.
    for replicas, cpus in ((1, 1.0), (2, 1.0), (1, 2.0)):
        name, results[name], row = offline(specs, work, args.model, replicas, cpus, args.batch_size)
        rows.append(row)
    wall = online(args.model, specs, work)
    results["online_1"] = {"tours_per_hour": args.tours / wall * 3600, "wall_s": wall}
    rows.append(["online (Serve job), 1 replica", f"{results['online_1']['tours_per_hour']:.0f}", f"{wall:.1f}", "-"])
    print(format_table(["path", "tours/hour", "wall s", "outside model"], rows))
    scale = results["offline_2x1cpu"]["tours_per_hour"] / results["offline_1x1cpu"]["tours_per_hour"]
    print(goal_line(f"2 replicas {scale:.2f}x one (one core each) >= 1.8x", scale >= 1.8))
    share = results["offline_1x2cpu"]["outside_model_share"]
    print(goal_line(f"outside-model share {share:.1%} <= 5% at batch size {args.batch_size} (1 replica x 2 CPUs)",
                    share <= 0.05))
    ratio = results["online_1"]["tours_per_hour"] / results["offline_1x2cpu"]["tours_per_hour"]
    print(f"online / offline (1 replica x 2 CPUs): {ratio:.2f}x")
    write_json(args.json, {"tours": args.tours, "views": args.views, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
