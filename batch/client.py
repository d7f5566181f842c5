"""The HTTP client behind `diffpano bulk --endpoint`: submit specs as a job to a running server and follow it."""

from __future__ import annotations

import time

import requests
from tqdm import tqdm

from diffpano.specs import BulkSpec


def run_online(endpoint: str, specs: list[BulkSpec], output: str | None, api_key: str | None = None,
               progress: bool = True, poll_s: float = 1.0) -> dict:
    """POST the specs to /v1/jobs and poll the job until it ends; returns its last status (docs/http-api.md)."""
    base = endpoint.rstrip("/")
    headers = {"X-API-Key": api_key} if api_key else {}
    body = {"specs": [s.model_dump(exclude_none=True) for s in specs], "output": output}
    r = requests.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=60)
    if r.status_code != 202:
        raise ValueError(f"--endpoint: the server answered {r.status_code}: {r.text[:500]}")
    status = r.json()
    bar = tqdm(total=status["tours_total"], unit="tour", disable=not progress, desc=status["job_id"])
    while status["state"] in ("queued", "running"):
        time.sleep(poll_s)
        status = requests.get(f"{base}/v1/jobs/{status['job_id']}", headers=headers, timeout=60).json()
        bar.update(status["tours_done"] + status["tours_failed"] - bar.n)
    bar.close()
    return status
