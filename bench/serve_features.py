"""What the image-API features cost a user, over HTTP on one model replica: a streamed tour's first progress event
against the whole tour (and the same tour unstreamed), a LoRA's first request on a replica (cold load) against the
next ones (cached) and none, and a job webhook's delivery latency with one failed attempt retried.
Run: python bench/serve_features.py [--model DIR] [--views 4] [--steps 20] [--rounds 3] [--json PATH]
The LoRA is a rank-8 stage-1 adapter of the model with random weights (its loading cost is what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import requests  # noqa: E402
import torch  # noqa: E402
from common import format_table, free_port, write_json  # noqa: E402

SECRET = "whsec_" + "QmVuY2htYXJrIHNlY3JldCBrZXkgb2YgMzIgYnl0ZXMh"


def write_lora(model: str | None, root: Path) -> None:
    """A rank-8 LoRA of the model's UNet with random weights, as ROOT/bench (diffusers' format)."""
    from diffpano.models.lora import add_lora, save_lora
    from diffpano.pipelines.loading import resolve_model

    unet = resolve_model(model, "cpu").unet
    for p in add_lora(unet, rank=8):
        torch.nn.init.normal_(p, std=0.01)
    save_lora(unet, str(root / "bench"))


def streamed(url: str, body: dict) -> tuple[float, float]:
    """Seconds to the first progress event and to the tour event of a streamed request."""
    started, first = time.perf_counter(), None
    with requests.post(url + "/v1/tours", json=body | {"stream": True}, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if line == "event: progress" and first is None:
                first = time.perf_counter() - started
            if line == "event: tour":
                return first, time.perf_counter() - started
    raise RuntimeError("the stream ended without a tour")


def timed(url: str, body: dict) -> float:
    """Seconds of one unstreamed tour."""
    started = time.perf_counter()
    requests.post(url + "/v1/tours", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - started


class Receiver:
    """Webhook receiver on 127.0.0.1: the arrival time and body of each delivery; the first one answers 500."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict]] = []
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                got.append((time.time(), body))
                self.send_response(500 if len(got) == 1 else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


def webhook(url: str, body: dict) -> dict:
    """Delivery latency (arrival - the event's timestamp) of a 4-tour job's events, and the retry of the first."""
    receiver = Receiver()
    specs = [body | {"tour_id": f"bench-{i}"} for i in range(4)]
    r = requests.post(url + "/v1/jobs", json={"specs": specs, "webhook": receiver.url}, timeout=60)
    r.raise_for_status()
    deadline = time.time() + 600
    while not any(b["type"] == "job.completed" for _, b in receiver.got[1:]) and time.time() < deadline:
        time.sleep(0.1)
    receiver.http.shutdown()
    delivered = [(t - b["timestamp"], b["type"]) for t, b in receiver.got[1:]]
    return {"deliveries": len(receiver.got), "retry_after_s": receiver.got[1][0] - receiver.got[0][0],
            "latency_ms_median": 1000 * statistics.median(d for d, _ in delivered),
            "events": [kind for _, kind in delivered]}


def main() -> None:
    """Start the app on loopback, measure, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from ray import serve

    from serve.app import build_app

    loras = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    write_lora(args.model, loras)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    deployments = [{"name": "DiffPanoAPI", "ray_actor_options": {"num_cpus": 0}},
                   {"name": "PanoGenerator", "ray_actor_options": {"num_cpus": 2},
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}]
    settings = {"model": args.model, "lora_root": str(loras), "webhook_secret": SECRET,
                "webhook_allow": ["127.0.0.1"], "output_root": str(loras / "served")}
    serve.run(build_app(settings, deployments), name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a red bedroom with a wooden floor", "num_views": args.views,
            "num_inference_steps": args.steps, "seed": 0}
    timed(url, body)  # warm-up
    streams = [streamed(url, body) for _ in range(args.rounds)]
    plain = [timed(url, body) for _ in range(args.rounds)]
    cold = timed(url, body | {"lora": "bench"})
    cached = [timed(url, body | {"lora": "bench"}) for _ in range(args.rounds)]
    hook = webhook(url, body)
    serve.shutdown()
    first, whole = statistics.median(s[0] for s in streams), statistics.median(s[1] for s in streams)
    rows = [["streamed: first progress event", f"{first:.2f} s"], ["streamed: the whole tour", f"{whole:.2f} s"],
            ["unstreamed tour", f"{statistics.median(plain):.2f} s"],
            ["LoRA, first request on the replica (cold load)", f"{cold:.2f} s"],
            ["LoRA, cached", f"{statistics.median(cached):.2f} s"],
            ["webhook delivery latency (median)", f"{hook['latency_ms_median']:.0f} ms"],
            ["webhook retry after a failed attempt", f"{hook['retry_after_s']:.2f} s"]]
    print(f"{args.views}-view tours, {args.steps} steps, model {args.model or 'bundled'}, medians of {args.rounds}")
    print(format_table(["measure", "value"], rows))
    print(f"webhook events: {hook['events']} ({hook['deliveries']} deliveries)")
    write_json(args.json, {"first_progress_s": first, "streamed_tour_s": whole, "plain_tour_s": plain,
                           "lora_cold_s": cold, "lora_cached_s": cached, "webhook": hook})


if __name__ == "__main__":
    main()
