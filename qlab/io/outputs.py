"""Where a command may write: never over an input, never over user data, one writer at a time.

Three rules every command that writes a folder follows:

- **Inputs are read-only.** An output folder that is an input, lies inside an input
  folder, or holds an input file is refused, ``--force`` or not.
- **Existing data is the user's.** A non-empty folder is written into only when it is a
  previous output of the *same* command (its ``.qlab-output.json`` stamp says so) or with
  ``--force``; a folder holding a dataset or a run is refused even with ``--force``
  unless the command makes that kind of folder (``qlab data`` rebuilding a dataset).
  Outputs that hold resumable rows record what produced them (``provenance``) and
  refuse rows of another checkpoint, policy, dataset, budget or codec.
- **One writer.** :func:`output_lock` takes an exclusive ``flock`` on the folder; a second
  process is refused with the first one's pid. The kernel drops the lock when its
  holder dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qlab.checks import parse_json
from qlab.errors import ConfigError
from qlab.io.atomic import atomic_write_json

__all__ = [
    "STAMP_NAME",
    "claim_output_dir",
    "folder_kind",
    "input_digest",
    "output_lock",
    "read_stamp",
    "refuse_inputs",
]

STAMP_NAME = ".qlab-output.json"
LOCK_NAME = ".qlab.lock"


def folder_kind(folder: Path) -> str | None:
    """``"dataset"`` or ``"run"`` when ``folder`` holds one (files qlab reads as input), else None."""
    if (folder / "model.safetensors").is_file() or (folder / "optimizer.pt").is_file():
        return "run"
    if (folder / "config.json").is_file() and (folder / ".checkpoint-staging").exists():
        return "run"
    if any(folder.glob("*_000000.bin")) or (folder / "tokenizer.model").is_file():
        return "dataset"
    if (folder / "meta.json").is_file() and _is_dataset_meta(folder / "meta.json"):
        return "dataset"
    return None


def _json_object(path: Path) -> dict[str, Any] | None:
    """``path``'s JSON object, or None when it is absent, unreadable or not an object."""
    try:
        obj = parse_json(path.read_bytes(), str(path), ConfigError)
    except (OSError, ConfigError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_dataset_meta(path: Path) -> bool:
    meta = _json_object(path)
    return meta is not None and "shards" in meta


def read_stamp(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The stamp a qlab command left in ``folder`` (None when absent or unreadable)."""
    return _json_object(Path(folder) / STAMP_NAME)


def claim_output_dir(
    out: str | os.PathLike,
    command: str,
    inputs: Sequence[str | os.PathLike | None] = (),
    *,
    force: bool = False,
    provenance: Mapping[str, Any] | None = None,
    makes: str | None = None,
) -> bool:
    """Check that ``command`` may write into ``out``, create it and stamp it.

    Returns True when earlier rows of the same provenance may be reused, False when the
    folder starts afresh (new, or ``--force`` over rows of another provenance: the
    caller drops them). ``makes`` names the kind of folder the command builds
    (``"dataset"``), which ``--force`` then may replace.
    """
    out_p = Path(out)
    if provenance is not None:  # compared with the stamp as JSON holds it (tuples become lists)
        provenance = json.loads(json.dumps(dict(provenance), sort_keys=True))
    refuse_inputs(out_p, inputs, force)
    if out_p.exists() and not out_p.is_dir():
        raise ConfigError(f"{out_p}: exists and is not a folder (choose another --out)")
    stamp = read_stamp(out_p) if out_p.is_dir() else None
    reuse = True
    if out_p.is_dir() and any(p.name != LOCK_NAME for p in out_p.iterdir()):
        reuse = _may_write(out_p, command, stamp, force, provenance, makes)
    out_p.mkdir(parents=True, exist_ok=True)
    record = {"command": command, **({"provenance": dict(provenance)} if provenance is not None else {})}
    if stamp != record:
        atomic_write_json(out_p / STAMP_NAME, record)
    return reuse


def _may_write(
    out: Path,
    command: str,
    stamp: dict[str, Any] | None,
    force: bool,
    provenance: Mapping[str, Any] | None,
    makes: str | None,
) -> bool:
    kind = folder_kind(out)
    if kind is not None and kind != makes:
        raise ConfigError(
            f"{out}: holds a {kind}; `qlab {command}` never writes into one, --force or not "
            "(choose another --out)"
        )
    if stamp is None or stamp.get("command") != command or kind is not None:
        if not force:
            what = f"a {kind}" if kind else "files qlab did not write for this command"
            raise ConfigError(f"{out}: already holds {what}; pass --force to write into it anyway")
        return False
    if provenance is None or stamp.get("provenance") == dict(provenance):
        return True
    old = stamp.get("provenance") or {}
    differ = sorted(k for k in {*provenance, *old} if provenance.get(k) != old.get(k))
    if not force:
        raise ConfigError(
            f"{out}: holds `qlab {command}` results of another {', '.join(differ)}; choose another "
            "--out, or pass --force to discard them"
        )
    return False


def refuse_inputs(
    out: str | os.PathLike,
    inputs: Sequence[str | os.PathLike | None],
    force: bool = False,
    nested: bool = True,
) -> None:
    """ConfigError when ``out`` is an input, lies inside an input folder (unless not
    ``nested``: outputs that only add files beside an input's own) or, with ``force``,
    holds an input."""
    real = Path(out).resolve()
    for src in (Path(i) for i in inputs if i is not None):
        s = src.resolve()
        if real == s or (nested and s.is_dir() and s in real.parents):
            raise ConfigError(f"{out}: the output would write into the input {src} (choose another --out)")
        if force and real in s.parents:  # --force may replace what the folder holds: never an input
            raise ConfigError(f"{out}: holds the input {src}; --force never replaces an input")


@contextlib.contextmanager
def output_lock(
    folder: str | os.PathLike, what: str = "output folder", name: str = LOCK_NAME
) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the ``with`` block;
    ``name`` is the lock file inside it (one folder may hold several locks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise ConfigError(
                f"{folder}: another qlab process (pid {holder}) is writing this {what}; wait for it "
                "to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def input_digest(path: str | os.PathLike | None) -> str | None:
    """A SHA-256 naming an input as given, for provenance: a file's bytes; for a folder
    (run, dataset, HF checkpoint) its JSON manifests' bytes — they carry the weights' and
    shards' own SHA-256 — and every other file's name and size. None for None; names
    that are not paths (``"embedded"``) stand for themselves."""
    if path is None:
        return None
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        _hash_file(h, p)
    elif p.is_dir():
        for f in sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")):
            h.update(f.name.encode("utf-8", "surrogateescape") + b"\0")
            if f.suffix == ".json":
                _hash_file(h, f)
            else:
                h.update(str(f.stat().st_size).encode())
    else:
        h.update(str(path).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
