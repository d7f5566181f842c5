"""Memory a call allocates on the CPU, read from torch.profiler's allocation events (for benchmarks and tests)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side prints warnings there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_profiler(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, total) bytes allocated on the CPU during one call: the running sum's maximum, and all allocations."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        raise RuntimeError("the profiler recorded no memory events")
    level = peak = total = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
        total += max(event.nbytes(), 0)
    return peak, total
