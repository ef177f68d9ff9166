"""Training configuration: ``TrainConfig``, train presets, and Parameter Golf's env variables.

Precedence, lowest to highest: preset default → environment variable → CLI flag.
A malformed value raises ConfigError naming the variable (or field) and the value.

Environment variables honoured (Parameter Golf's ``train_gpt.py`` names where it has
one; ``*`` marks qlab-only names):

=============================  ==================================  ==========
variable                       field                               type
=============================  ==================================  ==========
ITERATIONS                     train.iterations                    int
TRAIN_BATCH_TOKENS             train.train_batch_tokens            int
TRAIN_SEQ_LEN                  train.train_seq_len (+ model)       int
GRAD_ACCUM_STEPS               train.grad_accum                    int
MAX_WALLCLOCK_SECONDS          train.max_wallclock_seconds         float
GPTQ_RESERVE_SECONDS           train.gptq_reserve_seconds          float
WARMDOWN_FRAC                  train.warmdown_frac                 float
WARMDOWN_ITERS                 train.warmdown_frac = N/ITERATIONS  int
WARMUP_STEPS                   train.warmup_steps                  int
MATRIX_LR                      train.matrix_lr (Muon)              float
MUON_MOMENTUM                  train.muon_momentum                 float
MUON_MOMENTUM_WARMUP_START     train.muon_momentum_warmup_start    float
MUON_MOMENTUM_WARMUP_STEPS     train.muon_momentum_warmup_steps    int
MUON_BACKEND_STEPS             train.muon_ns_steps                 int
MUON_WD                        train.muon_wd                       float
MUON_ROW_NORMALIZE             train.muon_row_normalize            bool
TIED_EMBED_LR                  train.embed_lr                      float
EMBED_WD                       train.embed_wd                      float
SCALAR_LR                      train.scalar_lr                     float
ADAM_WD                        train.scalar_wd                     float
BETA1 / BETA2 / ADAM_EPS       train.beta1 / beta2 / adam_eps      float
GRAD_CLIP_NORM                 train.grad_clip                     float
EMA_DECAY                      train.ema_decay (0 = off)           float
SEED                           train.seed                          int
VAL_LOSS_EVERY                 train.val_every                     int
VAL_MAX_TOKENS *               train.val_max_tokens                int
EVAL_STRIDE                    train.sliding_stride (final score)  int
SLIDING_WINDOW_ENABLED         train.final_sliding                 bool
MIN_LR                         train.min_lr (warm-down floor)      float
EMBED_LR / HEAD_LR             train.untied_embed_lr / head_lr     float
VAL_BATCH_TOKENS               train.val_batch_seqs (per rank)     int
DATA_DIR                       train.data (unless DATA_PATH)       str
TRAIN_LOG_EVERY                train.log_every                     int
CHECKPOINT_EVERY *             train.checkpoint_every              int
COMPILE *                      train.compile                       bool
DATA_PATH                      train.data                          str
LOADER *                       train.loader (qlab | record)        str
TOKENIZER_PATH                 train.tokenizer_path                str
RUN_ID                         train.out_dir = runs/RUN_ID         str
VOCAB_SIZE                     model.vocab_size                    int
NUM_LAYERS                     model.num_layers                    int
MODEL_DIM                      model.model_dim                     int
NUM_HEADS / NUM_KV_HEADS       model.num_heads / num_kv_heads      int
MLP_MULT                       model.mlp_mult                      float
TIE_EMBEDDINGS                 model.tie_embeddings                bool
TIED_EMBED_INIT_STD            model.embed_init_std                float
ROPE_BASE                      model.rope_base                     float
ROPE_DIMS                      model.rope_dims                     int
QK_GAIN_INIT                   model.q_gain_init                   float
LOGIT_SOFTCAP                  model.logit_softcap                 float
LN_SCALE                       model.ln_scale                      bool
ENABLE_LOOPING_AT              model.loop_start_frac               float
EVAL_SEQ_LEN                   model.eval_seq_len                  int
BIGRAM_BUCKETS / BIGRAM_DIM    model.bigram_buckets / bigram_dim   int
SKIP_GATES_ENABLED             model.skip_gates                    bool
PRECISION *                    model.precision (fp32 | record)     str
XSA_LAST_N                     model.xsa / xsa_last_n              int
NUM_LOOPS/LOOP_START/LOOP_END  model.loop_repeats / loop_layers    int
EMBEDDING_DIM                  must equal MODEL_DIM                int
QAT_BITS *                     train.qat_bits (0 = off)            int
QAT_K *                        train.qat_k                         float
QAT_START_FRAC *               train.qat_start_frac                float
SWA_EVERY *                    train.swa_every (0 = off)           int
SWA_BLEND *                    train.swa_blend                     float
CURRICULUM_BUCKETS *           train.curriculum_buckets (0 = off)  int
CURRICULUM_FLOOR *             train.curriculum_floor              float
=============================  ==================================  ==========

Every variable PR #1394's ``Hyperparameters`` reads is accepted with its meaning. Its
quantization variables (MATRIX_BITS, EMBED_BITS, MATRIX_CLIP_SIGMAS, EMBED_CLIP_SIGMAS,
GPTQ_CALIBRATION_BATCHES, COMPRESSOR) are checked here and applied by ``qlab quantize``;
ROPE_TRAIN_SEQ_LEN and MUON_BETA2 are read but unused by the record itself, and so by qlab;
RANK / WORLD_SIZE / LOCAL_RANK come from torchrun.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qlab.checks import is_finite_number as _finite
from qlab.checks import is_int as _is_int
from qlab.config import MAX_LAYERS, ModelConfig, get_preset
from qlab.errors import ConfigError
from qlab.quant.policy import RecordQuant

AUTOCAST_MODES = ("auto", "bf16", "none")
LOADERS = ("qlab", "record")


@dataclass
class TrainConfig:
    """Every knob of the training loop. Defaults are the record stack (PAPERS.md §1)."""

    iterations: int = 20000
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum: int | None = None  # None = 8 // world_size (at least 1)
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    gptq_reserve_seconds: float = 12.0
    warmdown_frac: float = 0.667
    warmup_steps: int = 20  # compile warm-up steps, run then discarded
    matrix_lr: float = 0.02
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_wd: float = 0.085
    muon_row_normalize: bool = True
    muon_ns_steps: int = 5
    embed_lr: float = 0.03  # the tied embedding (the record's TIED_EMBED_LR)
    untied_embed_lr: float = 0.6  # tok_emb when the head is untied (EMBED_LR)
    head_lr: float = 0.008  # the untied lm_head: Adam without weight decay, as the record (HEAD_LR)
    embed_wd: float = 0.085
    scalar_lr: float = 0.02
    scalar_wd: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    min_lr: float = 0.0  # floor of the LR multiplier during warm-down (the record's MIN_LR)
    grad_clip: float = 0.3  # 0 = off
    ema_decay: float = 0.997  # 0 = off
    seed: int = 1337
    val_every: int = 1000  # 0 = only at the end
    val_max_tokens: int = 1 << 20  # 0 = the whole validation split
    val_batch_seqs: int = 16
    eval_stride: int | None = None
    final_sliding: bool = False  # also score the final weights with a sliding window
    sliding_stride: int = 64  # that window's stride (the record's EVAL_STRIDE)
    log_every: int = 50
    checkpoint_every: int = 0  # 0 = only at the end
    compile: bool | None = None  # None = on for CUDA (as the record), off on CPU
    autocast: str = "auto"  # "auto" = bf16 on CUDA, none on CPU
    device: str = "auto"
    loader: str = "qlab"  # "qlab" (one seeded global stream) or "record" (PR #1394's order)
    data: str = "embedded"  # a dataset directory, or "embedded" for the built-in corpus
    tokenizer_path: str | None = None
    out_dir: str = "runs/default"
    regs: dict[str, float] = field(default_factory=dict)  # regularizer name -> weight
    # Quantization-aware training (qlab.train.qat): int-b fake quant with an STE on the
    # nn.Linear weights matching qat_patterns, from qat_start_frac of training on.
    qat_bits: int = 0  # 0 = off
    qat_k: float = 12.85  # SDClip k of the fake-quant scale
    qat_start_frac: float = 0.0
    qat_patterns: list[str] = field(default_factory=lambda: ["blocks.*.weight"])
    # SWA (qlab.train.swa): a snapshot every swa_every steps of warm-down; the shipped
    # weights are swa_blend·EMA + (1 − swa_blend)·SWA (the SWA mean alone without EMA).
    swa_every: int = 0  # 0 = off
    swa_blend: float = 0.5
    # Entropy-bucket curriculum (qlab.train.curriculum): easy → hard crossfade with a floor.
    curriculum_buckets: int = 0  # 0 = off (plain shuffled loader)
    curriculum_floor: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.qat_patterns, (tuple, str)):  # JSON round-trips need a list
            self.qat_patterns = (
                [self.qat_patterns] if isinstance(self.qat_patterns, str) else list(self.qat_patterns)
            )
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"train config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown train config field(s): {', '.join(unknown)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> TrainConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown train config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    # ---- batch geometry --------------------------------------------------------------
    def grad_accum_for(self, world_size: int) -> int:
        """Micro-steps per optimizer step: the explicit value, else 8 // world_size (≥ 1)."""
        return self.grad_accum if self.grad_accum is not None else max(8 // world_size, 1)

    def compile_on(self, device_type: str) -> bool:
        """Whether to torch.compile: as set, else on for CUDA only (CPU compile is slow to build)."""
        return self.compile if self.compile is not None else device_type == "cuda"

    def seqs_per_rank(self, world_size: int) -> int:
        """Sequences one rank processes per optimizer step (all its micro-steps together)."""
        accum = self.grad_accum_for(world_size)
        per = self.train_seq_len * world_size * accum
        if self.train_batch_tokens % per:
            raise ConfigError(
                f"train_batch_tokens={self.train_batch_tokens} must be divisible by "
                f"train_seq_len × world_size × grad_accum = {self.train_seq_len} × {world_size} × {accum}"
            )
        return self.train_batch_tokens // (self.train_seq_len * world_size)


def _validate(c: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"TrainConfig: {msg}")

    for name in ("iterations", "train_batch_tokens", "train_seq_len", "muon_ns_steps", "val_batch_seqs"):
        v = getattr(c, name)
        need(_is_int(v) and v > 0, f"{name} must be a positive integer, got {v!r}")
    for name in ("warmup_steps", "muon_momentum_warmup_steps", "val_every", "val_max_tokens", "log_every"):
        v = getattr(c, name)
        need(_is_int(v) and v >= 0, f"{name} must be a non-negative integer, got {v!r}")
    need(_is_int(c.checkpoint_every) and c.checkpoint_every >= 0, "checkpoint_every must be >= 0")
    need(c.grad_accum is None or (_is_int(c.grad_accum) and c.grad_accum > 0), "grad_accum must be >= 1")
    need(c.eval_stride is None or (_is_int(c.eval_stride) and c.eval_stride > 0), "eval_stride must be >= 1")
    need(_is_int(c.sliding_stride) and c.sliding_stride > 0, "sliding_stride must be >= 1")
    for name in (
        "max_wallclock_seconds", "gptq_reserve_seconds", "matrix_lr", "muon_wd", "embed_lr", "embed_wd",
        "scalar_lr", "scalar_wd", "grad_clip", "adam_eps", "untied_embed_lr", "head_lr",
    ):  # fmt: skip
        v = getattr(c, name)
        need(_finite(v) and v >= 0, f"{name} must be a finite non-negative number, got {v!r}")
    need(_finite(c.warmdown_frac) and 0 <= c.warmdown_frac <= 1, "warmdown_frac must lie in [0, 1]")
    need(_finite(c.min_lr) and 0 <= c.min_lr <= 1, f"min_lr must lie in [0, 1], got {c.min_lr!r}")
    need(c.compile is None or isinstance(c.compile, bool), f"compile must be bool or None: {c.compile!r}")
    need(isinstance(c.final_sliding, bool), f"final_sliding must be true or false, got {c.final_sliding!r}")
    for name in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2"):
        v = getattr(c, name)
        need(_finite(v) and 0 <= v < 1, f"{name} must lie in [0, 1), got {v!r}")
    need(_finite(c.ema_decay) and 0 <= c.ema_decay < 1, f"ema_decay must lie in [0, 1), got {c.ema_decay!r}")
    need(c.loader in LOADERS, f"loader must be one of {LOADERS}, got {c.loader!r}")
    need(not (c.loader == "record" and c.curriculum_buckets), "the curriculum sampler needs loader 'qlab'")
    need(c.autocast in AUTOCAST_MODES, f"autocast must be one of {AUTOCAST_MODES}, got {c.autocast!r}")
    need(
        c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
        f"device must be auto, cpu or cuda[:N], got {c.device!r}",
    )
    need(isinstance(c.regs, dict), "regs must be a dict name -> weight")
    for k, v in c.regs.items():
        need(isinstance(k, str) and _finite(v), f"regularizer weight for {k!r} must be a finite number")
    need(_is_int(c.seed) and 0 <= c.seed < 2**63, f"seed must be an integer in [0, 2**63), got {c.seed!r}")
    _validate_extras(c, need)


def _validate_extras(c: TrainConfig, need: Callable[[bool, str], None]) -> None:
    """QAT, SWA and curriculum fields."""
    need(
        _is_int(c.qat_bits) and (c.qat_bits == 0 or 2 <= c.qat_bits <= 8), "qat_bits must be 0 (off) or 2..8"
    )
    need(_finite(c.qat_k) and c.qat_k > 0, f"qat_k must be a positive number, got {c.qat_k!r}")
    need(_finite(c.qat_start_frac) and 0 <= c.qat_start_frac <= 1, "qat_start_frac must lie in [0, 1]")
    need(
        isinstance(c.qat_patterns, list) and bool(c.qat_patterns)
        and all(isinstance(p, str) and p for p in c.qat_patterns),
        f"qat_patterns must be a non-empty list of glob strings, got {c.qat_patterns!r}",
    )  # fmt: skip
    need(_is_int(c.swa_every) and c.swa_every >= 0, f"swa_every must be >= 0, got {c.swa_every!r}")
    need(_finite(c.swa_blend) and 0 <= c.swa_blend <= 1, f"swa_blend must lie in [0, 1], got {c.swa_blend!r}")
    need(_is_int(c.curriculum_buckets) and c.curriculum_buckets >= 0, "curriculum_buckets must be >= 0")
    n = max(c.curriculum_buckets, 1)
    need(
        _finite(c.curriculum_floor) and 0 <= c.curriculum_floor <= 1 / n,
        f"curriculum_floor must lie in [0, 1/curriculum_buckets], got {c.curriculum_floor!r}",
    )


# ---- presets -----------------------------------------------------------------------------

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The record's Hyperparameters defaults where they differ from TrainConfig's: validation
    # every 4,000 steps on the whole split, logs every 500, a final sliding-window score.
    "record": {
        "val_every": 4000,
        "log_every": 500,
        "val_max_tokens": 0,
        "final_sliding": True,
        "loader": "record",
    },
    # Parameter Golf's naive baseline ran 524,288 tokens per step at sequence length 1024.
    "baseline": {"train_batch_tokens": 524_288, "train_seq_len": 1024},
    # CPU-sized: 16 sequences of 256 tokens per step, step-based schedule, no compile warm-up.
    # EMA 0.997 averages over ~330 steps, longer than the whole run, so the saved weights
    # would stay close to the initialisation; 0.95 averages over the last ~20 steps.
    "tiny": {
        "iterations": 160,
        "ema_decay": 0.95,
        "train_batch_tokens": 4096,
        "train_seq_len": 256,
        "grad_accum": 1,
        "max_wallclock_seconds": 0.0,
        "gptq_reserve_seconds": 0.0,
        "warmup_steps": 0,
        "muon_momentum_warmup_steps": 50,
        "val_every": 50,
        "val_max_tokens": 32_768,
        "log_every": 10,
        "checkpoint_every": 50,
    },
}


def train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown train preset {name!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    return TrainConfig(**TRAIN_PRESETS[name])


# ---- environment variables -------------------------------------------------------------


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_int(text: str) -> int:
    return int(text.strip().replace("_", ""))


def _parse_float(text: str) -> float:
    v = float(text.strip())
    if not math.isfinite(v):
        raise ValueError(f"not finite: {text!r}")
    return v


def _parse_str(text: str) -> str:
    if not text.strip():
        raise ValueError("empty")
    return text


TRAIN_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "ITERATIONS": ("iterations", _parse_int),
    "TRAIN_BATCH_TOKENS": ("train_batch_tokens", _parse_int),
    "TRAIN_SEQ_LEN": ("train_seq_len", _parse_int),
    "GRAD_ACCUM_STEPS": ("grad_accum", _parse_int),
    "MAX_WALLCLOCK_SECONDS": ("max_wallclock_seconds", _parse_float),
    "GPTQ_RESERVE_SECONDS": ("gptq_reserve_seconds", _parse_float),
    "WARMDOWN_FRAC": ("warmdown_frac", _parse_float),
    "WARMUP_STEPS": ("warmup_steps", _parse_int),
    "MATRIX_LR": ("matrix_lr", _parse_float),
    "MUON_MOMENTUM": ("muon_momentum", _parse_float),
    "MUON_MOMENTUM_WARMUP_START": ("muon_momentum_warmup_start", _parse_float),
    "MUON_MOMENTUM_WARMUP_STEPS": ("muon_momentum_warmup_steps", _parse_int),
    "MUON_BACKEND_STEPS": ("muon_ns_steps", _parse_int),
    "MUON_WD": ("muon_wd", _parse_float),
    "MUON_ROW_NORMALIZE": ("muon_row_normalize", parse_bool),
    "TIED_EMBED_LR": ("embed_lr", _parse_float),
    "EMBED_WD": ("embed_wd", _parse_float),
    "SCALAR_LR": ("scalar_lr", _parse_float),
    "ADAM_WD": ("scalar_wd", _parse_float),
    "BETA1": ("beta1", _parse_float),
    "BETA2": ("beta2", _parse_float),
    "ADAM_EPS": ("adam_eps", _parse_float),
    "GRAD_CLIP_NORM": ("grad_clip", _parse_float),
    "EMA_DECAY": ("ema_decay", _parse_float),
    "SEED": ("seed", _parse_int),
    "VAL_LOSS_EVERY": ("val_every", _parse_int),
    "VAL_MAX_TOKENS": ("val_max_tokens", _parse_int),
    "EVAL_STRIDE": ("sliding_stride", _parse_int),
    "TRAIN_LOG_EVERY": ("log_every", _parse_int),
    "CHECKPOINT_EVERY": ("checkpoint_every", _parse_int),
    "COMPILE": ("compile", parse_bool),
    "DATA_PATH": ("data", _parse_str),
    "LOADER": ("loader", _parse_str),
    "TOKENIZER_PATH": ("tokenizer_path", _parse_str),
    "QAT_BITS": ("qat_bits", _parse_int),
    "QAT_K": ("qat_k", _parse_float),
    "QAT_START_FRAC": ("qat_start_frac", _parse_float),
    "SWA_EVERY": ("swa_every", _parse_int),
    "SWA_BLEND": ("swa_blend", _parse_float),
    "CURRICULUM_BUCKETS": ("curriculum_buckets", _parse_int),
    "CURRICULUM_FLOOR": ("curriculum_floor", _parse_float),
    "MIN_LR": ("min_lr", _parse_float),
    "EMBED_LR": ("untied_embed_lr", _parse_float),
    "HEAD_LR": ("head_lr", _parse_float),
    "SLIDING_WINDOW_ENABLED": ("final_sliding", parse_bool),
}

# Read by the record's Hyperparameters but never used by its code (ROPE_TRAIN_SEQ_LEN: its
# Rotary takes TRAIN_SEQ_LEN; MUON_BETA2: its Muon has no second moment). qlab checks that
# they parse, so a record command line runs unchanged, and otherwise ignores them as well.
RECORD_UNUSED_ENV: dict[str, Callable[[str], Any]] = {
    "ROPE_TRAIN_SEQ_LEN": _parse_int,
    "MUON_BETA2": _parse_float,
}

MODEL_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "VOCAB_SIZE": ("vocab_size", _parse_int),
    "NUM_LAYERS": ("num_layers", _parse_int),
    "MODEL_DIM": ("model_dim", _parse_int),
    "NUM_HEADS": ("num_heads", _parse_int),
    "NUM_KV_HEADS": ("num_kv_heads", _parse_int),
    "MLP_MULT": ("mlp_mult", _parse_float),
    "TIE_EMBEDDINGS": ("tie_embeddings", parse_bool),
    "TIED_EMBED_INIT_STD": ("embed_init_std", _parse_float),
    "ROPE_BASE": ("rope_base", _parse_float),
    "ROPE_DIMS": ("rope_dims", _parse_int),
    "QK_GAIN_INIT": ("q_gain_init", _parse_float),
    "LOGIT_SOFTCAP": ("logit_softcap", _parse_float),
    "LN_SCALE": ("ln_scale", parse_bool),
    "ENABLE_LOOPING_AT": ("loop_start_frac", _parse_float),
    "TRAIN_SEQ_LEN": ("train_seq_len", _parse_int),
    "EVAL_SEQ_LEN": ("eval_seq_len", _parse_int),
    "BIGRAM_BUCKETS": ("bigram_buckets", _parse_int),
    "BIGRAM_DIM": ("bigram_dim", _parse_int),
    "SKIP_GATES_ENABLED": ("skip_gates", parse_bool),
    "PRECISION": ("precision", _parse_str),
}

# The record's loop is NUM_LOOPS extra passes over layers LOOP_START..LOOP_END, and XSA on
# the last XSA_LAST_N layers; qlab's fields say the same as a layer tuple and a count.
_MODEL_SPECIAL_ENV = ("NUM_LOOPS", "LOOP_START", "LOOP_END", "XSA_LAST_N", "EMBEDDING_DIM")


def _parse_env_str(env: Mapping[str, str], var: str) -> str:
    try:
        return _parse_str(env[var])
    except ValueError as exc:
        raise ConfigError(f"environment variable {var}={env[var]!r} is malformed ({exc})") from exc


def _read_env(
    env: Mapping[str, str], table: Mapping[str, tuple[str, Callable[[str], Any]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var, (name, parse) in table.items():
        if var not in env:
            continue
        try:
            out[name] = parse(env[var])
        except ValueError as exc:
            raise ConfigError(f"environment variable {var}={env[var]!r} is malformed ({exc})") from exc
    return out


def _check_env(env: Mapping[str, str], table: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    return _read_env(env, {var: (var, parse) for var, parse in table.items()})


def model_env_overrides(env: Mapping[str, str], base: ModelConfig) -> dict[str, Any]:
    """ModelConfig fields set by environment variables, the record's loop and XSA names included."""
    out = _read_env(env, MODEL_ENV)
    raw = _check_env(env, {v: _parse_int for v in _MODEL_SPECIAL_ENV})
    num_layers = out.get("num_layers", base.num_layers)
    if {"NUM_LOOPS", "LOOP_START", "LOOP_END"} & set(raw):
        loops = raw.get("NUM_LOOPS", base.loop_repeats - 1 if base.loop_layers else 0)
        start = raw.get("LOOP_START", base.loop_layers[0] if base.loop_layers else 4)
        end = raw.get("LOOP_END", base.loop_layers[-1] if base.loop_layers else 5)
        if loops < 0 or not 0 <= start <= end < MAX_LAYERS or loops >= MAX_LAYERS:
            raise ConfigError(
                f"environment variables NUM_LOOPS={loops}, LOOP_START={start}, LOOP_END={end}: "
                f"need 0 <= NUM_LOOPS < {MAX_LAYERS} and 0 <= LOOP_START <= LOOP_END < {MAX_LAYERS}"
            )
        out["loop_layers"] = tuple(range(start, end + 1)) if loops > 0 else None
        out["loop_repeats"] = loops + 1 if loops > 0 else base.loop_repeats
    if "XSA_LAST_N" in raw:
        n = raw["XSA_LAST_N"]
        if n < 0:
            raise ConfigError(f"environment variable XSA_LAST_N={n} must be >= 0")
        out["xsa"] = n > 0
        out["xsa_last_n"] = None if n >= num_layers else n
    if "EMBEDDING_DIM" in raw and raw["EMBEDDING_DIM"] != out.get("model_dim", base.model_dim):
        raise ConfigError(
            f"environment variable EMBEDDING_DIM={raw['EMBEDDING_DIM']}: qlab's GPT has no embedding "
            f"projection, so EMBEDDING_DIM must equal MODEL_DIM ({out.get('model_dim', base.model_dim)})"
        )
    return out


def train_env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """TrainConfig fields set by environment variables (RUN_ID/WARMDOWN_ITERS resolved later)."""
    _check_env(env, RECORD_UNUSED_ENV)
    # The record quantizes at the end of training with its quantization variables; in qlab
    # `qlab quantize` applies them (qlab.quant.policy.RecordQuant). Checking them here makes a
    # malformed value fail before a 10-minute run rather than after it.
    RecordQuant.from_env(env)
    out = _read_env(env, TRAIN_ENV)
    if "DATA_DIR" in env and "DATA_PATH" not in env:
        # The record's layout: DATA_DIR/datasets/fineweb10B_sp{V}/ and DATA_DIR/tokenizers/.
        out["data"] = _parse_env_str(env, "DATA_DIR")
    if "RUN_ID" in env:
        run_id = env["RUN_ID"].strip()
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise ConfigError(f"environment variable RUN_ID={env['RUN_ID']!r} must be a plain name")
        out["out_dir"] = os.path.join("runs", run_id)
    return out


def resolve_configs(
    preset: str,
    train_overrides: Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[TrainConfig, ModelConfig]:
    """Preset defaults, then environment variables, then explicit (CLI) overrides."""
    env = os.environ if env is None else env
    model = get_preset(preset)
    base = dict(TRAIN_PRESETS.get(preset, {}))
    base.setdefault("train_seq_len", model.train_seq_len)
    train_fields = {**base, **train_env_overrides(env), **dict(train_overrides or {})}
    if (
        "WARMDOWN_ITERS" in env
        and "WARMDOWN_FRAC" not in env
        and "warmdown_frac" not in (train_overrides or {})
    ):
        try:
            iters = _parse_int(env["WARMDOWN_ITERS"])
        except ValueError as exc:
            raise ConfigError(
                f"environment variable WARMDOWN_ITERS={env['WARMDOWN_ITERS']!r} is malformed"
            ) from exc
        total = train_fields.get("iterations", TrainConfig.iterations)
        if iters < 0:
            raise ConfigError(f"environment variable WARMDOWN_ITERS={iters} must be >= 0")
        if not (_is_int(total) and total > 0):
            raise ConfigError(f"WARMDOWN_ITERS={iters} needs a positive ITERATIONS, got {total!r}")
        train_fields["warmdown_frac"] = min(iters / total, 1.0)
    if "VAL_BATCH_TOKENS" in env and "val_batch_seqs" not in (train_overrides or {}):
        train_fields["val_batch_seqs"] = _val_batch_seqs(env, train_fields)
    train = TrainConfig(**train_fields)
    model_fields = {**model_env_overrides(env, model), **dict(model_overrides or {})}
    model_fields.setdefault("train_seq_len", train.train_seq_len)
    model = model.replace(**model_fields)
    return train, model


def _val_batch_seqs(env: Mapping[str, str], train_fields: Mapping[str, Any]) -> int:
    """The record's VAL_BATCH_TOKENS, global: per rank tokens // (world × accum) // seq_len."""
    try:
        tokens = _parse_int(env["VAL_BATCH_TOKENS"])
        world = _parse_int(env.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"environment variable VAL_BATCH_TOKENS/WORLD_SIZE is malformed ({exc})") from exc
    accum = train_fields.get("grad_accum") or max(8 // max(world, 1), 1)
    seq_len = train_fields.get("train_seq_len", TrainConfig.train_seq_len)
    seqs = tokens // (max(world, 1) * accum) // seq_len
    if seqs < 1:
        raise ConfigError(
            f"environment variable VAL_BATCH_TOKENS={tokens} is less than one {seq_len}-token "
            f"sequence per rank and micro-step (world size {world}, grad accum {accum})"
        )
    return seqs
