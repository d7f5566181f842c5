"""Joining Ray: the one place the project calls ray.init, and the line that says which cluster a command uses."""

from __future__ import annotations

import os
import sys


def join_ray(log_to_driver: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one, and say which on stderr (no-op when joined)."""
    import ray

    if ray.is_initialized():
        return
    context = ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=log_to_driver, include_dashboard=False)
    print(cluster_line(context.address_info.get("gcs_address", "?")), file=sys.stderr, flush=True)


def cluster_line(address: str) -> str:
    """One line naming the joined cluster: address, nodes, CPUs, GPUs, and how another one is chosen."""
    import ray

    total = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    chosen = f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else (
        "RAY_ADDRESS unset: this machine's cluster, started here if none was running")
    return (f"ray: cluster {address}: {nodes} node{'s' * (nodes != 1)}, {total.get('CPU', 0):g} CPUs, "
            f"{total.get('GPU', 0):g} GPUs ({chosen})")
