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


class Background:
    """One call of fn at a time as a Ray task beside the driver's loop, on the driver's node (where its local
    output is): a compaction while a job runs, without holding up the job's dispatch."""

    def __init__(self, fn: Callable) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        join_ray()
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.task = ray.remote(fn).options(num_cpus=0, max_retries=0, scheduling_strategy=here,
                                           runtime_env={"env_vars": worker_env()})
        self.ref = None

    def start(self, *args: Any) -> bool:
        """Start fn(*args) unless the last call is still running (False then); its error raises here."""
        import ray

        if self.ref is not None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if not ready:
                return False
            ray.get(self.ref)
        self.ref = self.task.remote(*args)
        return True

    def wait(self) -> None:
        """Wait for the last call to end (its error raises here)."""
        import ray

        if self.ref is not None:
            ray.get(self.ref)
            self.ref = None
