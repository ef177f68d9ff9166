"""Model configuration: one dataclass and the named presets (baseline, record, tiny).

``ModelConfig`` describes every switch of the reference GPT (``qlab.model.GPT``). The
two Parameter Golf references (PAPERS.md §1) are presets, so their exact parameter
counts (17,059,912 and 35,943,512) are properties of this file plus the model code.
Every field is validated on construction, so a bad value fails here with the field's
name instead of deep inside torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qlab.checks import is_int as _is_int
from qlab.errors import ConfigError

ACTIVATIONS = ("relu2", "leaky_relu2")
# "fp32": every parameter and table in float32 (qlab's default). "record": as PR #1394 ran —
# tok_emb stored and trained in bf16, RoPE tables built in bf16 (positions included),
# Muon's orthogonalised update rounded to bf16 (see docs/record.md).
PRECISIONS = ("fp32", "record")

# Fields stored as tuples in the dataclass but as lists in JSON.
_TUPLE_FIELDS = ("loop_layers", "value_embed_layers")


@dataclass
class ModelConfig:
    """Every architectural switch of the reference GPT.

    Defaults are the record stack (PR #1394); the ablation switches (BigramHash,
    windowed attention, value embeddings) default to off.
    """

    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    activation: str = "leaky_relu2"  # "relu2" (baseline) or "leaky_relu2"
    leaky_slope: float = 0.5
    tie_embeddings: bool = True
    embed_init_std: float = 0.005
    orthogonal_init: bool = True  # orthogonal init for linears >= 64x64 (else PyTorch default)
    rope_base: float = 10000.0
    rope_dims: int | None = 16  # None = the full head dimension
    rope_ntk: bool = True  # rescale the RoPE base when a sequence is longer than train_seq_len
    q_gain_init: float = 4.0
    ln_scale: bool = True  # scale block norms' outputs by 1/sqrt(layer + 1)
    xsa: bool = True
    xsa_last_n: int | None = None  # XSA on the last n layers only (None = every layer when xsa)
    logit_softcap: float = 30.0
    skip_gates: bool = True
    loop_layers: tuple[int, ...] | None = (4, 5)  # contiguous block repeated once looping is on
    loop_repeats: int = 3  # how many times the loop segment runs in total
    loop_start_frac: float = 0.5  # fraction of training after which looping is switched on
    bigram_buckets: int = 0  # 0 = no BigramHash embedding
    bigram_dim: int = 128
    attn_window: int | None = None  # None = full causal attention
    value_embed_layers: tuple[int, ...] = field(default_factory=tuple)
    train_seq_len: int = 2048
    eval_seq_len: int = 2048
    precision: str = "fp32"  # one of PRECISIONS

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        _validate(self)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    def uses_xsa(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` applies XSA (the record's XSA_LAST_N rule)."""
        if not self.xsa:
            return False
        return self.xsa_last_n is None or layer_idx >= self.num_layers - self.xsa_last_n

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head (``rope_dims`` resolved)."""
        return self.head_dim if self.rope_dims is None else self.rope_dims

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError naming them."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated like any new config)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"ModelConfig: {message}")


_POSITIVE_INTS = (
    "vocab_size",
    "num_layers",
    "model_dim",
    "num_heads",
    "num_kv_heads",
    "train_seq_len",
    "eval_seq_len",
    "loop_repeats",
    "bigram_dim",
)
_POSITIVE_FLOATS = ("mlp_mult", "embed_init_std", "rope_base", "logit_softcap", "q_gain_init")
_BOOLS = ("tie_embeddings", "orthogonal_init", "rope_ntk", "ln_scale", "xsa", "skip_gates")


def _validate(c: ModelConfig) -> None:
    """Check every field; raise ConfigError naming the first bad one."""
    _validate_types(c)
    _validate_shapes(c)
    _validate_loop(c)
    _validate_extras(c)
    _validate_size(c)


# Bounds that stop a hostile or mistyped config (a run's config.json, an artifact's
# model_config) before anything is allocated: far above any model this workbench studies.
MAX_PARAMETERS = 4_000_000_000
MAX_LAYERS = 1024
MAX_DIM = 65_536
MAX_VOCAB = 1 << 20
MAX_SEQ_LEN = 1 << 20


def estimated_parameters(c: ModelConfig) -> int:
    """Parameter count from the config alone (embeddings, blocks, head), without building."""
    d = c.model_dim
    per_block = 2 * d * d + 2 * d * c.kv_dim + 2 * d * c.mlp_hidden + 5 * d
    embed = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    extras = c.bigram_buckets * c.bigram_dim + len(c.value_embed_layers) * c.vocab_size * c.kv_dim
    return int(c.num_layers * per_block + embed + extras)


def _validate_size(c: ModelConfig) -> None:
    for name, cap in (
        ("num_layers", MAX_LAYERS), ("model_dim", MAX_DIM), ("num_heads", MAX_DIM), ("vocab_size", MAX_VOCAB),
        ("train_seq_len", MAX_SEQ_LEN), ("eval_seq_len", MAX_SEQ_LEN), ("loop_repeats", MAX_LAYERS),
        ("bigram_buckets", MAX_VOCAB), ("bigram_dim", MAX_DIM),
    ):  # fmt: skip
        value = getattr(c, name)
        _require(value <= cap, f"{name} = {value} exceeds qlab's limit of {cap}")
    _require(c.mlp_mult <= 64, f"mlp_mult = {c.mlp_mult} exceeds qlab's limit of 64")
    n = estimated_parameters(c)
    _require(n <= MAX_PARAMETERS, f"config has {n:,} parameters, over the limit {MAX_PARAMETERS:,}")


def _validate_types(c: ModelConfig) -> None:
    for name in _POSITIVE_INTS:
        value = getattr(c, name)
        _require(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
    for name in _POSITIVE_FLOATS:
        value = getattr(c, name)
        _require(_finite_positive(value), f"{name} must be a finite positive number, got {value!r}")
    for name in _BOOLS:
        value = getattr(c, name)
        _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
    _require(c.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {c.precision!r}")
    _require(c.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {c.activation!r}")
    _require(
        isinstance(c.leaky_slope, (int, float)) and math.isfinite(c.leaky_slope),
        f"leaky_slope must be a finite number, got {c.leaky_slope!r}",
    )
    _require(
        isinstance(c.loop_start_frac, (int, float)) and 0.0 <= c.loop_start_frac <= 1.0,
        f"loop_start_frac must lie in [0, 1], got {c.loop_start_frac!r}",
    )


def _validate_shapes(c: ModelConfig) -> None:
    _require(
        c.model_dim % c.num_heads == 0,
        f"model_dim ({c.model_dim}) must be divisible by num_heads ({c.num_heads})",
    )
    _require(
        c.num_heads % c.num_kv_heads == 0,
        f"num_heads ({c.num_heads}) must be divisible by num_kv_heads ({c.num_kv_heads})",
    )
    _require(c.head_dim % 2 == 0, f"head_dim ({c.head_dim}) must be even for RoPE")
    _require(c.mlp_hidden > 0, f"mlp_mult ({c.mlp_mult}) gives an empty MLP hidden layer")
    if c.rope_dims is not None:
        _require(
            _is_int(c.rope_dims) and 0 < c.rope_dims <= c.head_dim and c.rope_dims % 2 == 0,
            f"rope_dims must be an even integer in [2, head_dim={c.head_dim}] or None, got {c.rope_dims!r}",
        )


def _validate_loop(c: ModelConfig) -> None:
    if c.loop_layers is None:
        return
    layers = c.loop_layers
    _require(
        isinstance(layers, tuple) and len(layers) > 0 and all(_is_int(i) for i in layers),
        f"loop_layers must be a non-empty tuple of layer indices or None, got {layers!r}",
    )
    _require(
        list(layers) == list(range(layers[0], layers[0] + len(layers))),
        f"loop_layers must be contiguous and increasing, got {layers!r}",
    )
    _require(
        layers[0] >= 0 and layers[-1] < c.num_layers,
        f"loop_layers {layers!r} must lie inside [0, num_layers={c.num_layers})",
    )


def _validate_extras(c: ModelConfig) -> None:
    _require(
        _is_int(c.bigram_buckets) and (c.bigram_buckets == 0 or c.bigram_buckets >= 2),
        f"bigram_buckets must be 0 (off) or an integer >= 2 (the last bucket marks the sequence start), "
        f"got {c.bigram_buckets!r}",
    )
    if c.attn_window is not None:
        _require(
            _is_int(c.attn_window) and c.attn_window > 0,
            f"attn_window must be a positive integer or None, got {c.attn_window!r}",
        )
    if c.xsa_last_n is not None:
        _require(
            _is_int(c.xsa_last_n) and 0 <= c.xsa_last_n <= c.num_layers,
            f"xsa_last_n must be an integer in [0, num_layers={c.num_layers}] or None, got {c.xsa_last_n!r}",
        )
    layers = c.value_embed_layers
    _require(
        isinstance(layers, tuple) and all(_is_int(i) and 0 <= i < c.num_layers for i in layers),
        f"value_embed_layers must be a tuple of layer indices in [0, {c.num_layers}), got {layers!r}",
    )
    _require(len(set(layers)) == len(layers), f"value_embed_layers has duplicates: {layers!r}")


def _finite_positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _baseline() -> ModelConfig:
    """The naive Parameter Golf baseline: 9x512, relu^2 MLP 2x, vocab 1024 (17,059,912 params)."""
    return ModelConfig(
        vocab_size=1024,
        num_layers=9,
        mlp_mult=2.0,
        activation="relu2",
        orthogonal_init=False,
        rope_dims=None,
        rope_ntk=False,
        q_gain_init=1.5,
        ln_scale=False,
        xsa=False,
        skip_gates=False,
        loop_layers=None,
        train_seq_len=1024,
        eval_seq_len=1024,
    )


def _record() -> ModelConfig:
    """The PR #1394 record stack: 11x512, LeakyReLU(0.5)^2 MLP 4x, vocab 8192 (35,943,512 params)."""
    return ModelConfig()


def _tiny() -> ModelConfig:
    """CPU demo size with every record-stack feature (partial RoPE, XSA, gates, a looped pair)."""
    return ModelConfig(
        vocab_size=1024,
        num_layers=4,
        model_dim=128,
        num_heads=4,
        num_kv_heads=2,
        mlp_mult=3.0,
        rope_dims=8,  # a quarter of the head, as 16 of 64 in the record
        loop_layers=(1, 2),
        train_seq_len=256,
        eval_seq_len=256,
    )


PRESETS: dict[str, ModelConfig] = {"baseline": _baseline(), "record": _record(), "tiny": _tiny()}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset; unknown names raise ConfigError listing them."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
