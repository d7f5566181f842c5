"""A pool of Ray actors (model replicas, encoders) working through batches that belong to the job, not to an actor.

Plain Ray core actors rather than a Ray Data actor pool: Ray Data passes its actors' constructor arguments through
the object store while asking for restarts, which Ray cannot honour (ray-project/ray#53727, logged as an ERROR on
every job), and its results reached the driver only at the end, so progress could not move.

An actor is fed only while it answers: when it dies (its node lost, a crash) the batches it held go back to the queue
for any live actor, and the actor is asked again once Ray has restarted it where there is room, holding no work while
it waits. A batch may therefore run twice, so its output must be named after the batch (a re-run overwrites, never
duplicates).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from diffpano.defaults import STALL_S
from diffpano.io.storage import worker_env
from fanout.cluster import join_ray

MAX_ATTEMPTS = 3  # tries of one batch on actors that died under it before it is given up
TICK_S = 2.0  # how often map_on_actors asks on_idle while no actor answers


class StalledError(RuntimeError):
    """No actor answered for the stall limit while batches remained (the cluster has no room for any)."""


@dataclass
class PoolState:
    """What a progress bar shows of a pool: actors answering, batches re-queued after an actor died, given up."""

    actors: int
    live: int = 0
    requeued: int = 0
    given_up: int = 0

    def line(self) -> str:
        """'3/3 live' plus what went wrong, for a progress bar's postfix."""
        text = f"{self.live}/{self.actors} live"
        if self.requeued:
            text += f", {self.requeued} re-queued"
        return text + (f", {self.given_up} given up" if self.given_up else "")


def start_actors(cls: type, count: int, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> list:
    """count actors of cls(*args), restarted after a crash wherever there is room, with this process's storage env.
    Their tasks are not retried by Ray: map_on_actors moves the work of a dead actor to a live one."""
    import ray

    join_ray()
    actor = ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
                                    runtime_env={"env_vars": worker_env()})
    return [actor.remote(*args) for _ in range(count)]


def map_on_actors(actors: list, method: str, batches: Iterable, *, per_actor: int = 2,
                  max_attempts: int = MAX_ATTEMPTS, stall_s: float = STALL_S,
                  on_give_up: Callable[[Any, Exception], Any] | None = None,
                  on_state: Callable[[PoolState], None] | None = None,
                  on_idle: Callable[[float], bool] | None = None) -> Iterator[Any]:
    """actor.method(batch) of every batch, results as they finish. A live actor holds per_actor batches (one running,
    the rest queued so it never waits on the driver), drawn from the iterable as actors free up. A batch whose actor
    died is re-queued; after max_attempts it yields on_give_up(batch, error) (or raises without it). An error the
    method itself raises propagates. StalledError when no actor answers for stall_s while work remains, unless
    on_idle(seconds since the last answer), asked every TICK_S of silence, says the wait has a known cause (True)."""
    import ray

    pool = _Pool(actors, method, iter(batches), per_actor, PoolState(len(actors)), on_state)
    answered = time.monotonic()
    deadline = answered + stall_s
    while pool.running or (pool.has_work() and pool.pings):
        timeout = max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait([*pool.running, *pool.pings], num_returns=1,
                            timeout=timeout if on_idle is None else min(timeout, TICK_S))
        if not ready:
            if on_idle is not None and on_idle(time.monotonic() - answered):
                deadline = time.monotonic() + stall_s
            if time.monotonic() >= deadline:
                raise StalledError(f"no actor answered for {stall_s:.0f}s with work left ({pool.state.line()}): the "
                                   "cluster has no room for any")
            continue
        ref = ready[0]
        if ref in pool.pings:
            if pool.answered(ref):
                answered = time.monotonic()
                deadline = answered + stall_s
            continue
        index, attempt, batch = pool.running.pop(ref)
        pool.held[index] -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            pool.lost(index, err)
            if attempt + 1 < max_attempts:
                pool.requeue(attempt + 1, batch)
                continue
            if on_give_up is None:
                raise
            pool.state.given_up += 1
            pool.notify()
            yield on_give_up(batch, err)
            continue
        answered = time.monotonic()
        deadline = answered + stall_s
        pool.feed(index)
        yield result
    if pool.has_work():  # every actor failed to start
        raise pool.init_error


class _Pool:
    """map_on_actors' bookkeeping: which actors answer, what each holds, the batches waiting for one."""

    def __init__(self, actors: list, method: str, fresh: Iterator, per_actor: int, state: PoolState,
                 on_state: Callable[[PoolState], None] | None) -> None:
        self.actors, self.method, self.fresh, self.per_actor = actors, method, fresh, per_actor
        self.state, self.on_state = state, on_state
        self.queue: deque = deque()  # (attempt, batch) re-queued, served before fresh batches
        self.exhausted = False
        self.live: set[int] = set()
        self.held = [0] * len(actors)
        self.running: dict = {}  # ref -> (actor index, attempt, batch)
        self.pings: dict = {}  # ref -> actor index, for actors not known to be alive
        self.init_error: Exception = RuntimeError("no actor to run on")
        for i in range(len(actors)):
            self.ping(i)

    def ping(self, index: int) -> None:
        """Ask an actor whether it is alive (answered once Ray has it running, wherever it was restarted)."""
        self.pings[self.actors[index].__ray_ready__.remote()] = index

    def answered(self, ref) -> bool:
        """An actor answered its ping: True when it is live (it gets work); a failed ping is asked again, unless the
        actor cannot start at all."""
        import ray

        index = self.pings.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self.lost(index, err)
            return False
        self.live.add(index)
        self.notify()
        self.feed(index)
        return True

    def lost(self, index: int, err: Exception) -> None:
        """An actor died: it gets no work until it answers again (never, when its constructor failed)."""
        self.live.discard(index)
        self.notify()
        if getattr(err, "actor_init_failed", False):
            self.init_error = err
        elif index not in self.pings.values():
            time.sleep(0.2)  # Ray may not know yet that it is restarting; do not spin on a dead handle
            self.ping(index)

    def requeue(self, attempt: int, batch: Any) -> None:
        """Put a batch back for any live actor."""
        self.queue.append((attempt, batch))
        self.state.requeued += 1
        self.notify()
        for index in sorted(self.live, key=lambda i: self.held[i]):
            self.feed(index)

    def has_work(self) -> bool:
        """Whether batches remain to hand out."""
        if self.queue:
            return True
        if not self.exhausted:
            for batch in self.fresh:
                self.queue.append((0, batch))
                return True
            self.exhausted = True
        return False

    def feed(self, index: int) -> None:
        """Top a live actor up to per_actor batches."""
        while index in self.live and self.held[index] < self.per_actor and self.has_work():
            attempt, batch = self.queue.popleft()
            self.running[getattr(self.actors[index], self.method).remote(batch)] = (index, attempt, batch)
            self.held[index] += 1

    def notify(self) -> None:
        """Tell the caller the pool changed."""
        self.state.live = len(self.live)
        if self.on_state is not None:
            self.on_state(self.state)
