"""fanout on local Ray: actors that die hand their batches on, a batch that keeps killing its actor is given up,
and a pool with no room stops with a reason instead of hanging."""

from __future__ import annotations

import time

import pytest

from fanout.actors import PoolState, StalledError, map_on_actors, start_actors

pytestmark = pytest.mark.ray


def test_a_batch_that_kills_its_actor_every_time_is_given_up_and_the_others_complete(ray_local):
    class Squares:  # defined here so that Ray ships it by value
        def square(self, n: int) -> int:
            if n == 3:
                import os

                os._exit(1)  # the worker process dies, as on an out-of-memory kill
            return n * n

    states: list[str] = []
    given_up: list[int] = []
    results = list(map_on_actors(start_actors(Squares, 2), "square", range(8), per_actor=1, max_attempts=2,
                                 on_give_up=lambda n, err: given_up.append(n) or -1,
                                 on_state=lambda s: states.append(s.line())))
    assert sorted(results) == sorted([n * n for n in range(8) if n != 3] + [-1])
    assert given_up == [3]
    assert any("1 re-queued" in s for s in states) and "1 given up" in states[-1], states


def test_without_on_give_up_the_actor_error_is_raised(ray_local):
    import ray

    class Dies:
        def run(self, n: int) -> int:
            import os

            os._exit(1)

    with pytest.raises(ray.exceptions.RayActorError):
        list(map_on_actors(start_actors(Dies, 1), "run", [1], max_attempts=1))


def test_a_pool_the_cluster_has_no_room_for_stops_with_a_reason(ray_local):
    class Idle:
        def run(self, n: int) -> int:
            return n

    started = time.monotonic()
    with pytest.raises(StalledError, match="no actor answered for 3s with work left"):
        list(map_on_actors(start_actors(Idle, 1, num_cpus=64), "run", range(4), stall_s=3))
    assert time.monotonic() - started < 30


def test_an_actor_that_cannot_start_raises_its_error_at_once(ray_local):
    import ray

    class Broken:
        def __init__(self) -> None:
            raise ValueError("no model here")

        def run(self, n: int) -> int:
            return n

    with pytest.raises(ray.exceptions.RayActorError, match="no model here"):
        list(map_on_actors(start_actors(Broken, 2), "run", range(4), stall_s=60))


def test_the_state_line_names_live_actors_and_what_moved():
    assert PoolState(3, live=3).line() == "3/3 live"
    assert PoolState(3, live=2, requeued=2, given_up=1).line() == "2/3 live, 2 re-queued, 1 given up"
