"""How big each figure's experiment is: ``smoke`` (tests, seconds), ``default`` (the
committed figures: the ``tiny`` preset on the embedded corpus, minutes on a CPU) and
``full`` (a longer ``tiny`` run and every measurement on more tokens).

A :class:`Scale` only sizes the work; what is measured is the same at every scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from qlab.errors import ConfigError

__all__ = ["Scale", "SCALES", "get_scale"]


@dataclass(frozen=True)
class Scale:
    """Sizes of every experiment behind the figures.

    ``train`` / ``model`` are overrides of the ``tiny`` preset used when no checkpoint is
    given; the rest size the measurements (validation tokens scored, calibration
    batches, TTT chunking, sweep grids, the reg × quant matrix).
    """

    name: str
    train: dict[str, Any]
    model: dict[str, Any]
    eval_tokens: int
    calib_batches: int
    ttt_chunk_tokens: int
    ttt_batch_seqs: int
    sweep_bits: tuple[int, ...]
    sweep_ks: tuple[float, ...]
    rd_max_rows: int
    fingerprint_tokens: int
    matrix_variants: tuple[str, ...]
    matrix_seeds: tuple[int, ...]
    matrix_train: dict[str, Any] = field(default_factory=dict)
    ttt_epochs: tuple[int, ...] = (1, 2, 3, 4)

    def key(self) -> str:
        """Short hash of every field: names the cache so a changed scale rebuilds."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


_SMOKE_MODEL = {
    "vocab_size": 512,
    "model_dim": 48,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "rope_dims": 8,
    "mlp_mult": 2.0,
    "loop_layers": [1],
    "loop_repeats": 2,
    "eval_seq_len": 64,
}
_SMOKE_TRAIN = {
    "iterations": 40,
    "train_batch_tokens": 1024,
    "train_seq_len": 64,
    "grad_accum": 1,
    "muon_momentum_warmup_steps": 10,
    "val_every": 0,
    "val_max_tokens": 8192,
    "log_every": 5,
    "checkpoint_every": 0,
    "ema_decay": 0.9,
}
_MATRIX_SMOKE_TRAIN = {
    "iterations": 12,
    "train_batch_tokens": 256,
    "train_seq_len": 64,
    "grad_accum": 1,
    "muon_momentum_warmup_steps": 6,
    "val_every": 0,
    "val_max_tokens": 2049,
    "log_every": 6,
    "checkpoint_every": 0,
    "ema_decay": 0.9,
}
_MATRIX_DEFAULT_TRAIN = {**_MATRIX_SMOKE_TRAIN, "iterations": 40, "train_batch_tokens": 512, "log_every": 10}

SCALES: dict[str, Scale] = {
    "smoke": Scale(
        name="smoke",
        train=_SMOKE_TRAIN,
        model=_SMOKE_MODEL,
        eval_tokens=4096,
        calib_batches=4,
        ttt_chunk_tokens=1024,
        ttt_batch_seqs=8,
        sweep_bits=(4, 6),
        sweep_ks=(6.0, 10.0, 12.85, 16.0),
        rd_max_rows=32,
        fingerprint_tokens=256,
        matrix_variants=("ES=0.05", "QAHSP_GRID=0.15+ES=0.03"),
        matrix_seeds=(0,),
        matrix_train=_MATRIX_SMOKE_TRAIN,
        ttt_epochs=(1, 2),
    ),
    "default": Scale(
        name="default",
        train={"val_every": 25, "log_every": 5},
        model={},
        eval_tokens=32_768,
        calib_batches=16,
        ttt_chunk_tokens=4096,
        ttt_batch_seqs=16,
        sweep_bits=(4, 5, 6, 7),
        sweep_ks=(6.0, 8.0, 10.0, 12.85, 16.0, 20.0),
        rd_max_rows=256,
        fingerprint_tokens=1024,
        matrix_variants=("ES=0.05", "QAHSP_GRID=0.3", "QAHSP_GRID=0.15+ES=0.03"),
        matrix_seeds=(0, 1),
        matrix_train=_MATRIX_DEFAULT_TRAIN,
    ),
    # `make demo`: every figure from the demo's own checkpoint, measured on fewer tokens
    # and smaller grids than `default` so the whole demo stays within ten minutes on 2 cores.
    "demo": Scale(
        name="demo",
        train={"val_every": 25, "log_every": 5},
        model={},
        eval_tokens=8192,
        calib_batches=8,
        ttt_chunk_tokens=2048,
        ttt_batch_seqs=8,
        sweep_bits=(4, 6, 8),
        sweep_ks=(6.0, 10.0, 12.85, 20.0),
        rd_max_rows=64,
        fingerprint_tokens=512,
        matrix_variants=("ES=0.05", "QAHSP_GRID=0.15+ES=0.03"),
        matrix_seeds=(0, 1),  # two seeds: the paired deltas get an interval and a test
        matrix_train=_MATRIX_SMOKE_TRAIN,
        ttt_epochs=(1, 2),
    ),
    "full": Scale(
        name="full",
        train={"iterations": 1000, "val_every": 100, "log_every": 10},
        model={},
        eval_tokens=0,
        calib_batches=64,
        ttt_chunk_tokens=32_768,
        ttt_batch_seqs=32,
        sweep_bits=(3, 4, 5, 6, 7, 8),
        sweep_ks=(4.0, 6.0, 8.0, 10.0, 12.85, 16.0, 20.0, 24.0),
        rd_max_rows=1024,
        fingerprint_tokens=4096,
        matrix_variants=("ES=0.05", "QAHSP_GRID=0.3", "WOP=0.1", "QAHSP_GRID=0.15+ES=0.03"),
        matrix_seeds=(0, 1, 2),
        matrix_train={**_MATRIX_DEFAULT_TRAIN, "iterations": 200},
    ),
}


def get_scale(scale: str | Scale) -> Scale:
    """A :class:`Scale` by name (``smoke``, ``default``, ``full``) or as given."""
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise ConfigError(f"unknown figure scale {scale!r}; choose one of: {', '.join(SCALES)}")
    return SCALES[scale]
