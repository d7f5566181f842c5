"""Starting or joining Ray for offline jobs: the one place batch/ calls ray.init."""

from __future__ import annotations

import os


def ensure_ray(log_to_driver: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one (workers' prints shown here when log_to_driver)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=log_to_driver, include_dashboard=False)
