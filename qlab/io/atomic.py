"""Atomic file writes: write to a temporary file beside the target, fsync, rename.

A crash or kill at any moment leaves either the old file or the new one, never a
half-written file — the guarantee resumable training and the matrix builder rely on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from qlab.errors import ConfigError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_WRITER}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode open() would have (0666 & ~umask)
        # so collaborators on a shared machine can read what qlab writes
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    _fsync_dir(path.parent)
    return path


def _read_umask() -> int:
    # The only portable way to read the umask is to set it and restore it; done once, at
    # import (setting it while other threads create files would race with them).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform, so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


STALE_TMP_SECONDS = 3600.0  # a temp file this old belongs to a killed write, not a live one
# Who writes a temp file: this host (hashed: names may hold dots) and process, so the next
# write on the same host sweeps the files of a killed process at once, not an hour later.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_WRITER = f"{_HOST}-{os.getpid()}"
_TMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


def _writer_gone(name: str) -> bool:
    """True when the temp file ``name`` was written on this host by a process that has exited."""
    m = _TMP_NAME.match(name)
    if m is None or m["host"] != _HOST or int(m["pid"]) == os.getpid():
        return False
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def check_output(out: str | os.PathLike, inputs: list[str | os.PathLike], force: bool = False) -> Path:
    """Refuse an output that is (or lies inside) an input, or that exists without ``force``.

    ``--force`` replaces an earlier *output*; it never makes an input writable.
    """
    out_p = Path(out)
    real = out_p.resolve()
    for src in inputs:
        src_p = Path(src).resolve()
        inside = src_p.is_dir() and src_p in real.parents
        if real == src_p or (inside and _is_input_file(real)):
            raise ConfigError(f"{out_p}: the output would overwrite the input {src} (choose another path)")
    if out_p.exists() and not force:
        raise ConfigError(f"{out_p} already exists; pass --force to overwrite it")
    return out_p


# Files a run, dataset or checkpoint directory is read from: an output may sit beside
# them (runs/x/model.qlab) but never replace one.
_INPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".model", ".jsonl", ".ptz")
_INPUT_NAMES = ("config.json", "meta.json", "model.safetensors.index.json", "manifest.json")


def _is_input_file(p: Path) -> bool:
    return p.exists() and (p.suffix in _INPUT_SUFFIXES or p.name in _INPUT_NAMES)


def sweep_stale_tmp(directory: str | os.PathLike, max_age_s: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files left by killed atomic writes: those whose writer (on this
    host) has exited, and any older than ``max_age_s``."""
    now = time.time()
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        try:
            if p.is_file() and (_writer_gone(p.name) or now - p.stat().st_mtime > max_age_s):
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed
