"""A function over many items as Ray tasks: a bounded window in flight, results as they finish, failures per item."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from diffpano.io.storage import worker_env
from fanout.cluster import join_ray


def map_tasks(fn: Callable, items: Iterable[tuple], *, max_in_flight: int | None = None, num_cpus: float = 1.0,
              max_retries: int = 2, on_error: Callable[[tuple, Exception], Any] | None = None) -> Iterator[Any]:
    """fn(*item) of each item as a Ray task (at most max_in_flight at once; default twice the cluster's CPUs), in
    the order they finish. A task that still fails after max_retries (its worker died, say) raises, or yields
    on_error(item, error) when given. Items are drawn from the iterable only as the window has room."""
    import ray

    join_ray()
    task = ray.remote(fn).options(num_cpus=num_cpus, max_retries=max_retries,
                                  runtime_env={"env_vars": worker_env()})
    limit = max_in_flight or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    todo, running = iter(items), {}  # ref -> item
    for item in todo:
        running[task.remote(*item)] = item
        if len(running) >= limit:
            break
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        item = running.pop(ref)
        for more in todo:
            running[task.remote(*more)] = more
            break
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            if on_error is None:
                raise
            result = on_error(item, err)
        yield result


def _beside_driver() -> dict:
    """Ray options that place a task or an actor on the driver's node (where a local output is), using no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    join_ray()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return {"num_cpus": 0, "scheduling_strategy": here, "runtime_env": {"env_vars": worker_env()}}


def task_beside(fn: Callable) -> Any:
    """fn as a Ray remote function that runs on the driver's node, not retried."""
    import ray

    return ray.remote(fn).options(max_retries=0, **_beside_driver())


def actor_beside(cls: type, *args: Any) -> Any:
    """An actor cls(*args) on the driver's node, not restarted: state a job keeps beside its loop."""
    import ray

    return ray.remote(cls).options(max_restarts=0, **_beside_driver()).remote(*args)


class Background:
    """One call at a time of a remote function or actor method beside the driver's loop: a compaction while a job
    runs, without holding up the job's dispatch."""

    def __init__(self, remote: Any, *args: Any) -> None:
        self.remote, self.args, self.ref = remote, args, None

    def start(self) -> bool:
        """Start a call unless the last one is still running (False then); the last one's error raises here."""
        import ray

        if self.ref is not None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if not ready:
                return False
            ray.get(self.ref)
        self.ref = self.remote.remote(*self.args)
        return True

    def wait(self) -> None:
        """Wait for the last call to end (its error raises here)."""
        import ray

        if self.ref is not None:
            ray.get(self.ref)
            self.ref = None
