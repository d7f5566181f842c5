"""Small helpers shared by test modules."""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

KEY = "test-key-123"  # the API key of the `server` fixture
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the `server` fixture signs job webhooks with it
METERED_KEY, METERED_QUOTA = "metered-key-456", 6  # a second key of the `server` fixture, 6 images a minute

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
POSE = "[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, X]"
# Each numeric field a client can write, as a body template whose X the test replaces by a non-finite token.
TOUR_FIELDS = {
    "seed": '{"prompt": "a", "seed": X}',
    "num_inference_steps": '{"prompt": "a", "num_inference_steps": X}',
    "guidance_scale": '{"prompt": "a", "guidance_scale": X}',
    "height": '{"prompt": "a", "height": X}',
    "width": '{"prompt": "a", "width": X}',
    "num_views": '{"prompt": "a", "num_views": X}',
    "poses": '{"prompt": "a", "poses": [' + POSE + "]}",
    "trajectory.spacing": '{"prompt": "a", "trajectory": {"kind": "walk", "spacing": X}}',
    "trajectory.turn_deg": '{"prompt": "a", "trajectory": {"kind": "walk", "turn_deg": X}}',
    "trajectory.heading_deg": '{"prompt": "a", "trajectory": {"kind": "walk", "heading_deg": X}}',
    "trajectory.radius": '{"prompt": "a", "trajectory": {"kind": "orbit", "radius": X}}',
    "trajectory.arc_deg": '{"prompt": "a", "trajectory": {"kind": "orbit", "arc_deg": X}}',
}


def plain(text: str) -> str:
    """CLI output without rich's boxes and line breaks."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def post(url: str, path: str, body: dict, key: str | None = KEY, **kw) -> requests.Response:
    """POST a JSON body to the test server with its API key."""
    headers = {"X-API-Key": key} if key else {}
    return requests.post(url + path, json=body, headers=headers, timeout=kw.pop("timeout", 120), **kw)


def wait_until(check, what: str, timeout_s: float = 300, poll_s: float = 0.05):
    """Poll check() until it returns something true, and return that; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)
    return value


def free_port() -> int:
    """An unused TCP port on 127.0.0.1, picked by the OS."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def check_output(root: str, tours: int, views: int, with_ray: bool = True) -> None:
    """docs/tours.md: one row per view, unique (tour_id, view_index), every image a complete 2:1 PNG; four readers
    (Ray Data's among them when with_ray: it joins the test's Ray)."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    from diffpano.io import storage
    from diffpano.io.manifest import decode_rgb, read_manifest

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
        assert len(pd.read_parquet(path)) == len(table)
    if with_ray:
        import ray

        # the filesystem carries this process's keys: Ray's workers may have started before they were set
        assert ray.data.read_parquet(path, filesystem=fs).count() == len(table)


RAY_CURRENT = Path("/tmp/ray/ray_current_cluster")  # where a bare ray.init() looks for "this machine's cluster"


@contextmanager
def multinode_cluster(workers: int, cpus: float = 1, head_cpus: float = 0) -> Iterator[tuple]:
    """(cluster, worker nodes) of Ray's multi-node harness in a temp dir of its own, torn down after. The harness
    writes RAY_CURRENT; it is put back at once, so no other process's bare ray.init() joins this cluster (its
    users pass RAY_ADDRESS=cluster.address)."""
    from ray.cluster_utils import Cluster

    before = RAY_CURRENT.read_text() if RAY_CURRENT.exists() else None
    temp = tempfile.mkdtemp(prefix="raync", dir="/tmp")  # short: Ray's socket paths live under it
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "temp_dir": temp,
                                                                "include_dashboard": False})
        _restore(before)
        nodes = [cluster.add_node(num_cpus=cpus) for _ in range(workers)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        if cluster is not None:
            cluster.shutdown()
        _restore(before)
        shutil.rmtree(temp, ignore_errors=True)


def _restore(text: str | None) -> None:
    """Put RAY_CURRENT back as it was."""
    if text is None:
        RAY_CURRENT.unlink(missing_ok=True)
    else:
        RAY_CURRENT.write_text(text)
