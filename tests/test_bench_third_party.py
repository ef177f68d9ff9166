"""The third-party download: pinned, verified, and never keeps a file that does not match."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import pytest

from benchmarks import third_party


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fake(monkeypatch, tmp_path, payload: bytes, pinned: bytes):
    c = dataclasses.replace(
        third_party.CATALOGUE[0], sha256=hashlib.sha256(pinned).hexdigest(), size=len(pinned)
    )
    monkeypatch.setattr(third_party, "DIR", tmp_path)
    monkeypatch.setattr(third_party, "CATALOGUE", (c,))
    monkeypatch.setattr(third_party.urllib.request, "urlopen", lambda url, timeout: _Response(payload))
    return c


def test_a_matching_download_is_kept_and_counts_as_present(monkeypatch, tmp_path):
    c = _fake(monkeypatch, tmp_path, b"weights", b"weights")
    assert third_party.present() == []
    assert third_party.download(c).read_bytes() == b"weights"
    assert third_party.present() == [c]


def test_a_download_with_another_hash_is_refused_and_removed(monkeypatch, tmp_path):
    c = _fake(monkeypatch, tmp_path, b"tampered", b"weights")
    with pytest.raises(SystemExit, match="SHA-256"):
        third_party.download(c)
    assert list(tmp_path.iterdir()) == []


def test_every_entry_is_pinned_to_a_full_commit_and_hash():
    for c in third_party.CATALOGUE:
        assert len(c.commit) == 40 and len(c.sha256) == 64, c.name
        assert c.url.startswith("https://raw.githubusercontent.com/") and c.commit in c.url
