"""Peak memory and time of one call, measured in a forked child: its own high-water mark.

The long-lived pytest process's ``ru_maxrss`` is a high-water mark too, so growth below an
earlier peak of the suite is invisible there; a child starts its mark at its RSS at the
fork (Linux copies the current RSS into the new mm's high-water mark). The child's address
space is capped, so a runaway allocation fails there (MemoryError) instead of swapping the
machine.
"""

from __future__ import annotations

import os
import pickle
import re
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Report:
    growth_mib: float  # peak RSS of the child minus its RSS at the fork
    seconds: float
    error: BaseException | None  # what the call raised (None: it returned)
    trace: str  # its formatted traceback ("" when it returned)


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_in_child(fn: Callable[..., Any], *args: Any, cap_mib: int = 4096) -> Report:
    """Run ``fn(*args)`` in a fork whose address space may grow by at most ``cap_mib``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without pytest's handlers
        os.close(r)
        try:
            grow = cap_mib << 20
            resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + grow, resource.RLIM_INFINITY))
            start, t0 = _status("VmRSS"), time.perf_counter()
            err, trace = None, ""
            try:
                fn(*args)
            except BaseException as exc:  # reported to the parent, which decides
                err, trace = exc, traceback.format_exc()
            report = Report((_status("VmHWM") - start) / 2**20, time.perf_counter() - t0, err, trace)
            try:
                payload = pickle.dumps(report)
            except Exception:
                report.error = RuntimeError(f"{type(err).__name__}: {err}")
                payload = pickle.dumps(report)
            os.write(w, payload)
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError(f"the child died without a report (wait status {status})")
    return pickle.loads(b"".join(chunks))


def peak_growth_mib(
    fn: Callable[..., Any], *args: Any, expect: type[BaseException] | None = None, match: str | None = None
) -> float:
    """Peak RSS growth of ``fn(*args)`` in MiB; it must return, or raise ``expect`` (whose
    message matches ``match``)."""
    rep = run_in_child(fn, *args)
    if expect is None:
        assert rep.error is None, rep.trace
    else:
        assert isinstance(rep.error, expect), rep.trace or "returned without raising"
        assert match is None or re.search(match, str(rep.error)), str(rep.error)
    return rep.growth_mib
