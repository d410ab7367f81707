"""Training keeps the memory it frees: glibc's malloc settings while a network trains.

A training step allocates activations and gradients and frees them all at its end. By default glibc
gives the freed top of its heap back to the operating system once it exceeds a threshold, and takes
blocks above another one straight from the system; the next step then asks for the same memory again
and the kernel hands it over page by page, zeroing each (minor page faults). Fine-tuning MiniLM on one
thread, that was ~25,000 faults per step and ~10% of the step (benchmarks/pretrained.py): the reason a
plain loop, and the runner, trained slower than Hugging Face's Trainer, whose loop happens to leave
something alive at the top of the heap so that it is never given back.

`kept_heap()` makes that deliberate: while it is open, every block comes from the heap (M_MMAP_MAX 0:
none straight from the system, MiniLM's 47 MB embedding gradient included) and freed memory stays with
the process for the next step (M_TRIM_THRESHOLD 2 GB). When it closes, the thresholds go to what
glibc's dynamic adjustment settles on after its first large free (32 MB; give back above 64 MB) and
the kept memory is returned (malloc_trim), so
what is measured next (evaluation memory, latency) starts from live memory only. Setting a threshold
turns glibc's dynamic adjustment off for the process; that is why the thresholds are not put back to
its start values (128 kB, which would send every block above 128 kB to the system again).

Only where the C library is glibc (Linux); elsewhere it does nothing. `kept_heap_enabled()` says which.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameter numbers (malloc.h)
MB = 1 << 20
KEEP_TRIM = (1 << 31) - 1  # mallopt takes an int: about 2 GB of freed heap kept while training
MMAP_CEILING = 32 * MB  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: glibc refuses more
AFTER_TRIM = 2 * MMAP_CEILING  # glibc's own rule: give back above twice the mmap threshold
MMAP_MAX = 65536  # glibc's default number of blocks taken straight from the system


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError on musl, macOS, Windows)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def kept_heap_enabled() -> bool:
    """Whether kept_heap() changes anything here (the C library is glibc)."""
    return _glibc() is not None


def release_freed_memory() -> None:
    """Give the heap's freed memory back to the system now (glibc; a no-op elsewhere)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def _set(libc: ctypes.CDLL, trim: int, mmap_max: int) -> bool:
    settings = ((M_TRIM_THRESHOLD, trim), (M_MMAP_THRESHOLD, MMAP_CEILING), (M_MMAP_MAX, mmap_max))
    return all([bool(libc.mallopt(param, value)) for param, value in settings])  # a list: every one is set


@contextmanager
def kept_heap() -> Iterator[None]:
    """Freed memory stays with the process while the block runs (a training loop); given back after."""
    libc = _glibc()
    if libc is None:
        yield
        return
    if not _set(libc, KEEP_TRIM, 0):
        log.debug("mallopt refused the training heap settings; glibc's defaults stay")
    try:
        yield
    finally:
        _set(libc, AFTER_TRIM, MMAP_MAX)
        release_freed_memory()
