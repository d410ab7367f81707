"""Wall-clock helpers for the overhead figures a run logs (timing/*)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def process_start_time() -> float:
    """Unix time at which this process started (Linux /proc, to 10 ms; elsewhere: when this module loaded)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return _LOADED


_LOADED = time.time()


def timed(method: F) -> F:
    """Adds the wall time of `method` to `self.busy_s` (outermost call only, so nesting counts once)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(self, "_timed_depth", 0)
        self._timed_depth = depth + 1
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._timed_depth = depth
            if depth == 0:
                self.busy_s = getattr(self, "busy_s", 0.0) + time.perf_counter() - start

    return wrapper  # type: ignore[return-value]
