"""A pool of Ray actors (model replicas, encoders) working through batches, each result as soon as it is ready.

Plain Ray core actors rather than a Ray Data actor pool: Ray Data passes its actors' constructor arguments through
the object store while asking for restarts, which Ray cannot honour (ray-project/ray#53727, logged as an ERROR on
every job), and its results reached the driver only at the end, so progress could not move. Here each actor is built
from plain arguments and restarts after a crash, re-running the batch it held, so a batch's output must be named
after the batch (a re-run overwrites, never duplicates).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from diffpano.io.storage import worker_env
from fanout.cluster import join_ray


def start_actors(cls: type, count: int, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> list:
    """count actors of cls(*args), restarted after a crash (their task re-run), with this process's storage env."""
    import ray

    join_ray()
    actor = ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=-1,
                                    runtime_env={"env_vars": worker_env()})
    return [actor.remote(*args) for _ in range(count)]


def map_on_actors(actors: list, method: str, batches: Iterable, per_actor: int = 2) -> Iterator[Any]:
    """actor.method(batch) of every batch, results as they finish; an actor holds per_actor batches (one running,
    the rest queued so it never waits on the driver). Batches are drawn from the iterable as actors free up."""
    import ray

    todo, running = iter(batches), {}  # ref -> actor
    for actor in actors * per_actor:
        for batch in todo:
            running[getattr(actor, method).remote(batch)] = actor
            break
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor = running.pop(ref)
        for batch in todo:
            running[getattr(actor, method).remote(batch)] = actor
            break
        yield ray.get(ref)
