"""Giving freed heap memory back to the OS while a long stream of tensors is processed.

glibc keeps the holes large frees leave in its heap; a report that streams a checkpoint
tensor by tensor would otherwise grow by tens of MB per tensor. :class:`HeapTrimmer`
calls ``malloc_trim`` when the resident set has grown enough to be worth it; elsewhere
(not glibc, no ``/proc``) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

from qlab.errors import ConfigError

__all__ = ["TRIM_SLACK_BYTES", "HeapTrimmer", "available_bytes", "require_memory", "rss_bytes"]


# Heap growth (RSS) tolerated before freed heap pages are handed back to the OS.
TRIM_SLACK_BYTES = 256 << 20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def rss_bytes() -> int | None:
    """This process's resident set in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Hands freed heap pages back to the OS once RSS has grown ``TRIM_SLACK_BYTES`` (glibc).

    After the first large frees glibc raises its mmap threshold (up to 32 MB), so later
    multi-MB buffers come from the heap, whose holes it keeps: streaming a 1 GB
    checkpoint, RSS grew ~30 MB per tensor (1.2 GB after 36 tensors) until
    ``malloc_trim`` was called. Trimming after *every* tensor costs ~15 % of the report's
    time (the pages fault in again), so it happens only when the growth is worth it.
    """

    def __init__(self) -> None:
        self.trim = _malloc_trim()
        self.mark = rss_bytes() if self.trim is not None else None

    def __call__(self) -> None:
        if self.trim is None or self.mark is None:
            return
        rss = rss_bytes()
        if rss is not None and rss > self.mark + TRIM_SLACK_BYTES:
            self.trim(0)
            self.mark = rss_bytes() or rss


def available_bytes() -> int | None:
    """Memory the kernel says a new allocation can get (``MemAvailable``; None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: int, what: str) -> None:
    """MemoryError-free refusal: a ConfigError naming ``what`` when ``nbytes`` exceed the
    memory available, raised before anything is allocated (a hostile config cannot make
    qlab thrash or be killed)."""
    have = available_bytes()
    if have is not None and nbytes > have:
        raise ConfigError(
            f"{what} needs {nbytes / 1e9:.1f} GB, more than the {have / 1e9:.1f} GB of memory available"
        )
