"""qlab run-directory checkpoints: ``model.safetensors`` + ``optimizer.pt`` + ``config.json``.

- ``model.safetensors``: the weights to evaluate and quantize (the EMA when EMA is on);
- ``optimizer.pt``: everything needed to resume bit-exactly — raw weights, EMA, optimizer
  states, loader position, RNG states, step — as plain tensors/dicts/numbers, so it loads
  with ``torch.load(weights_only=True)``;
- ``config.json``: ``{"model", "train", "step", "tokens_seen", "weights", "qlab_version"}``.

A checkpoint is committed in two phases so a kill at any instant leaves a usable one:
all three files are written (each atomically) into ``.checkpoint-staging/``, with
``config.json`` last as the "staging complete" marker; then they are moved into the run
directory one by one (config.json last) and the staging folder removed. A complete
staging folder left by a kill between the moves is rolled forward by :func:`resume_state`
and preferred by the readers; an incomplete one is discarded.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from qlab._version import __version__
from qlab.checks import parse_json
from qlab.errors import CheckpointError
from qlab.io.atomic import atomic_write_bytes, atomic_write_json
from qlab.io.formats import weights_only_load

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "optimizer.pt"
STAGING_NAME = ".checkpoint-staging"
FORMAT_VERSION = 1
_FILES = (STATE_NAME, WEIGHTS_NAME, CONFIG_NAME)  # commit order: config.json last


def _version() -> str:
    return __version__


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clone so tensors sharing storage (tied weights) can be serialised independently.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    ema: Any,
    optimizers: Any,
    trainer_state: dict[str, Any],
    model_config: Any,
    train_config: Any,
    shipped: tuple[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint into ``run_dir`` (two-phase, crash-safe); return ``run_dir``.

    ``ema`` is an :class:`~qlab.train.ema.EMA` or None; ``optimizers`` anything with
    ``state_dict()``; ``trainer_state`` plain data with at least ``step`` and
    ``tokens_seen`` (loader state, RNG tensors, elapsed time, …). model.safetensors holds
    the EMA weights (raw without EMA) unless ``shipped = (kind, weights)`` names other
    weights to ship, e.g. ``("ema+swa", blend)``.
    """
    run_dir = Path(run_dir)
    staging = run_dir / STAGING_NAME
    if staging.exists():
        shutil.rmtree(staging)
    step = int(trainer_state["step"])
    raw = _plain_tensors(model.state_dict())
    if shipped is not None:
        weights_kind, weights = shipped[0], _plain_tensors(dict(shipped[1]))
    elif ema is not None:
        weights_kind, weights = "ema", _plain_tensors(ema.weights_like(model))
    else:
        weights_kind, weights = "raw", raw
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "model": raw,
        "ema": ema.state_dict() if ema is not None else None,
        "optimizers": optimizers.state_dict(),
        "trainer": trainer_state,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    state_bytes = buf.getvalue()
    atomic_write_bytes(staging / STATE_NAME, state_bytes)
    meta = {"step": str(step), "weights": weights_kind, "format": "qlab"}
    weights_bytes = st_save(weights, metadata=meta)
    atomic_write_bytes(staging / WEIGHTS_NAME, weights_bytes)
    config = {
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "step": step,
        "tokens_seen": int(trainer_state.get("tokens_seen", 0)),
        "weights": weights_kind,
        # depth recurrence switches on mid-run; evaluation must use the mode training ended in
        "looping": bool(trainer_state.get("looping", False)),
        "qlab_version": _version(),
        # Verified on load: a swapped, truncated or bit-flipped model.safetensors is refused.
        "weights_sha256": hashlib.sha256(weights_bytes).hexdigest(),
        # and optimizer.pt, which --resume loads (raw weights, EMA, optimizer and loader state)
        "state_sha256": hashlib.sha256(state_bytes).hexdigest(),
    }
    atomic_write_json(staging / CONFIG_NAME, config)
    _commit(run_dir)
    return run_dir


def _commit(run_dir: Path) -> None:
    """Move a complete staging folder's files into ``run_dir`` (idempotent)."""
    staging = run_dir / STAGING_NAME
    for name in _FILES:
        src = staging / name
        if src.exists():
            os.replace(src, run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def _staging_complete(run_dir: Path) -> bool:
    return (run_dir / STAGING_NAME / CONFIG_NAME).is_file()


def recover(run_dir: str | os.PathLike) -> None:
    """Finish a commit interrupted between moves, or drop an incomplete staging folder."""
    run_dir = Path(run_dir)
    if _staging_complete(run_dir):
        _commit(run_dir)
    elif (run_dir / STAGING_NAME).exists():
        shutil.rmtree(run_dir / STAGING_NAME, ignore_errors=True)


def committed_file(run_dir: Path, name: str) -> Path:
    """Where the committed ``name`` is: a complete staging folder wins (it is newer)."""
    if _staging_complete(run_dir) and (run_dir / STAGING_NAME / name).exists():
        return run_dir / STAGING_NAME / name
    return run_dir / name


def _as_run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file() and p.name in _FILES:
        p = p.parent
    if not p.is_dir():
        raise CheckpointError(f"{p}: run directory not found")
    return p


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    run_dir = Path(run_dir)
    return _staging_complete(run_dir) or (run_dir / CONFIG_NAME).is_file()


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's config.json as a dict (CheckpointError when missing or malformed)."""
    run_dir = _as_run_dir(run_dir)
    path = committed_file(run_dir, CONFIG_NAME)
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {CONFIG_NAME} (not a qlab run directory, or no checkpoint yet)")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc.strerror})") from exc
    cfg = parse_json(text, f"{path}: corrupt config", CheckpointError)
    if (
        not isinstance(cfg, dict)
        or not isinstance(cfg.get("model"), dict)
        or not isinstance(cfg.get("step"), int)
    ):
        raise CheckpointError(f"{path}: expected an object with 'model' (object) and 'step' (int)")
    return cfg


def load_checkpoint(run_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict of model.safetensors, config.json dict) of a run directory."""
    run_dir = _as_run_dir(run_dir)
    cfg = read_config(run_dir)
    path = committed_file(run_dir, WEIGHTS_NAME)
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc
    if "step" in meta and meta["step"] != str(cfg["step"]):
        raise CheckpointError(
            f"{run_dir}: {WEIGHTS_NAME} is from step {meta['step']} but {CONFIG_NAME} says step {cfg['step']}"
        )
    verify_file(path, cfg, "weights_sha256")
    return state, cfg


def verify_weights(run_dir: str | os.PathLike) -> Path:
    """The run's committed model.safetensors, checked against config.json's SHA-256 (every
    reader of a run directory goes through here: a bit-flipped weights file is refused)."""
    run_dir = _as_run_dir(run_dir)
    path = committed_file(run_dir, WEIGHTS_NAME)
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: {WEIGHTS_NAME} is missing")
    verify_file(path, read_config(run_dir), "weights_sha256")
    return path


def verify_file(path: Path, cfg: Mapping[str, Any], field: str) -> None:
    """CheckpointError unless ``path`` hashes to ``cfg[field]`` (runs written before the
    field existed carry none: nothing to check against)."""
    want = cfg.get(field)
    if want is None:
        return
    if not isinstance(want, str) or _sha256_file(path) != want:
        raise CheckpointError(
            f"{path}: SHA-256 differs from {CONFIG_NAME}'s {field} (damaged or replaced file)"
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with a CheckpointError naming missing / unexpected / mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model config: missing {_few(missing)}, "
            f"unknown keys {_few(unexpected)}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            need = tuple(own[k].shape)
            raise CheckpointError(
                f"{where}: tensor {k} has shape {tuple(v.shape)}, the model config needs {need}"
            )
    model.load_state_dict(state)


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" …" if len(names) > 5 else "") if names else "none"


def resume_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The contents of optimizer.pt (after rolling forward an interrupted commit)."""
    run_dir = _as_run_dir(run_dir)
    recover(run_dir)
    cfg = read_config(run_dir)
    path = run_dir / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: {STATE_NAME} is missing; cannot resume")
    # weights-only loading is safe on any bytes; the step check first names the likelier
    # mistake (a file of another checkpoint), the hash then catches damaged bytes
    state = weights_only_load(path, f"{path}: resume state")
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a qlab resume state (format {FORMAT_VERSION} expected)")
    for key in ("step", "model", "optimizers", "trainer"):
        if key not in state:
            raise CheckpointError(f"{path}: resume state lacks {key!r}")
    if state["step"] != cfg["step"]:
        raise CheckpointError(
            f"{run_dir}: {STATE_NAME} is from step {state['step']}, config.json from {cfg['step']}"
        )
    verify_file(path, cfg, "state_sha256")
    state["config"] = cfg
    return state
