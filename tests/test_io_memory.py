"""HeapTrimmer: malloc_trim only once the resident set has grown by the slack."""

from __future__ import annotations

import sys

import pytest

from qlab.io import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm is Linux's")
def test_rss_is_read_from_proc():
    rss = memory.rss_bytes()
    assert isinstance(rss, int) and rss > 1 << 20


def test_trims_only_past_the_slack(monkeypatch):
    calls = []
    sizes = iter([1000, 1000 + memory.TRIM_SLACK_BYTES, 1001 + memory.TRIM_SLACK_BYTES, 500, 600])
    monkeypatch.setattr(memory, "rss_bytes", lambda: next(sizes))
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    trimmer = memory.HeapTrimmer()  # mark = 1000
    trimmer()  # grown by exactly the slack: not worth a trim
    assert calls == []
    trimmer()  # one byte more: trim, then the mark is the RSS after it (500)
    assert calls == [0] and trimmer.mark == 500
    trimmer()  # 600: within the slack of the new mark
    assert calls == [0]


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    trimmer = memory.HeapTrimmer()
    trimmer()
    assert trimmer.mark is None
