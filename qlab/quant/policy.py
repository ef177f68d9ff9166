"""Per-tensor quantization policies: which tensor gets which quantizer.

A :class:`Policy` is an ordered list of :class:`Rule`s; the first rule whose name pattern
(fnmatch, or a regex when prefixed ``re:``) and optional conditions (float only, ndim,
element-count bounds) match a tensor decides its :class:`TensorSpec`. Non-float tensors
are always stored unchanged. Presets follow PAPERS.md §3 (``record``, ``record_pathA``,
``per_category``, ``rtn_int6``, ``rtn_int8``), plus ``record_small``: the record policy
scaled to CPU-size models (the "large matrix" threshold lowered from 65,536 to 4,096
elements, so a d=128 model's block matrices get int6 GPTQ as the record's d=512 ones
do, instead of all falling to fp16 passthrough). :func:`policy_from_dict` reads the
same structure from JSON/YAML.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from qlab.checks import is_finite_number
from qlab.checks import is_int as _is_int
from qlab.errors import ConfigError, QuantError
from qlab.io.formats import dtype_from_name
from qlab.quant.clip import CLIP_RULES
from qlab.quant.gptq import ARITHMETIC, gptq_quantize_many
from qlab.quant.rtn import GRANULARITIES, quantize_rtn
from qlab.quant.tensor import QuantizedTensor, dequantize

METHODS = ("gptq", "rtn", "passthrough")
PASSTHROUGH_KINDS = ("fp16", "int8_tensor", "int8_row", "raw")
SMALL = 65536  # float tensors with at most this many elements are "small" (passthrough)
SMALL_CPU = 4096  # the same threshold for CPU-size models (record_small)


@dataclass(frozen=True)
class TensorSpec:
    """How to store one tensor."""

    method: str = "gptq"
    bits: int = 6
    clip: str = "sdclip"
    clip_params: Mapping = field(default_factory=dict)
    granularity: str = "row"
    group_size: int | None = None
    symmetric: bool = True
    passthrough_dtype: str = "fp16"
    # GPTQ only: "record" computes exactly what the record computes (bit-identical codes),
    # "fast" takes the cheaper Hinv route and lazy updates (see qlab.quant.gptq)
    gptq_arithmetic: str = "record"
    # GPTQ only: the price of a bit in rate-aware rounding (qlab.quant.rounding); 0 = plain GPTQ
    gptq_rate_lambda: float = 0.0

    def __post_init__(self) -> None:
        def need(ok: bool, field_: str, want: str) -> None:
            if not ok:
                raise ConfigError(f"TensorSpec.{field_} must be {want}, got {getattr(self, field_)!r}")

        need(isinstance(self.method, str) and self.method in METHODS, "method", f"one of {METHODS}")
        need(
            isinstance(self.passthrough_dtype, str) and self.passthrough_dtype in PASSTHROUGH_KINDS,
            "passthrough_dtype", f"one of {PASSTHROUGH_KINDS}",
        )  # fmt: skip
        need(_is_int(self.bits) and 1 <= self.bits <= 16, "bits", "an integer in 1..16")
        need(isinstance(self.clip, str) and self.clip in CLIP_RULES, "clip", f"one of {sorted(CLIP_RULES)}")
        need(isinstance(self.granularity, str) and self.granularity in GRANULARITIES, "granularity",
             f"one of {GRANULARITIES}")  # fmt: skip
        need(self.group_size is None or (_is_int(self.group_size) and self.group_size > 0), "group_size",
             "a positive integer or null")  # fmt: skip
        need(isinstance(self.symmetric, bool), "symmetric", "true or false")
        need(self.gptq_arithmetic in ARITHMETIC, "gptq_arithmetic", f"one of {ARITHMETIC}")
        need(is_finite_number(self.gptq_rate_lambda) and self.gptq_rate_lambda >= 0, "gptq_rate_lambda",
             "a finite number ≥ 0")  # fmt: skip
        need(
            isinstance(self.clip_params, Mapping)
            and all(isinstance(k, str) and _is_param(v) for k, v in self.clip_params.items()),
            "clip_params", "a mapping of names to numbers",
        )  # fmt: skip


def _is_param(v: object) -> bool:
    """A clip parameter: a finite number, or a list of them (quantiles, shrink grids)."""
    if isinstance(v, (list, tuple)):
        return len(v) <= 4096 and all(_is_param(x) for x in v)
    return is_finite_number(v)


@dataclass(frozen=True)
class Rule:
    """Pattern (+ optional conditions) → spec. ``None`` conditions always match."""

    pattern: str
    spec: TensorSpec
    ndim: int | None = None
    min_numel: int | None = None
    max_numel: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"policy rule: pattern must be a non-empty string, got {self.pattern!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except (re.error, RecursionError, OverflowError) as exc:
                raise ConfigError(
                    f"policy rule: invalid regular expression {self.pattern!r} ({exc})"
                ) from None
        for name in ("ndim", "min_numel", "max_numel"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 0):
                raise ConfigError(
                    f"policy rule {self.pattern!r}: {name} must be a non-negative integer, got {v!r}"
                )

    def matches(self, name: str, tensor: torch.Tensor) -> bool:
        if self.pattern.startswith("re:"):
            if re.fullmatch(self.pattern[3:], name) is None:
                return False
        elif not fnmatchcase(name, self.pattern):
            return False
        n = tensor.numel()
        return (
            (self.ndim is None or tensor.dim() == self.ndim)
            and (self.min_numel is None or n >= self.min_numel)
            and (self.max_numel is None or n <= self.max_numel)
        )


@dataclass
class Passthrough:
    """A tensor kept (almost) as is: fp16, per-tensor int8 (fp32 scale), per-row int8
    (fp16 scales), or raw (non-float tensors, stored unchanged)."""

    data: torch.Tensor
    kind: str
    dtype: str
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None

    def validate(self) -> None:
        """Field types and sizes (an artifact rebuilds this from a header it must not trust)."""
        where = "passthrough entry"
        if not isinstance(self.data, torch.Tensor) or self.kind not in PASSTHROUGH_KINDS:
            raise QuantError(
                f"{where}: needs a data tensor and a kind in {PASSTHROUGH_KINDS}, got {self.kind!r}"
            )
        dtype_from_name(self.dtype, where)
        if not isinstance(self.shape, tuple) or not all(_is_int(d) and d >= 0 for d in self.shape):
            raise QuantError(f"{where}: shape must be a tuple of non-negative integers, got {self.shape!r}")
        if math.prod(self.shape) != self.data.numel():
            raise QuantError(f"{where}: shape {self.shape} does not hold its {self.data.numel()} values")
        needs_scale = self.kind.startswith("int8")
        if needs_scale != isinstance(self.scale, torch.Tensor):
            raise QuantError(f"{where}: kind {self.kind!r} {'needs' if needs_scale else 'has no'} scale")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored tensor in ``dtype`` (default: the original dtype)."""
        target = dtype or dtype_from_name(self.dtype, "passthrough entry")
        if self.kind in ("fp16", "raw"):
            return self.data.to(target).reshape(self.shape)
        assert self.scale is not None  # validate(): every int8 kind has a scale
        scale = self.scale.to(torch.float32)
        if self.kind == "int8_row" and self.data.dim() == 2:
            scale = scale.reshape(-1, 1)
        return (self.data.to(torch.float32) * scale).to(target).reshape(self.shape)


def make_passthrough(t: torch.Tensor, kind: str, name: str | None = None) -> Passthrough:
    """Store ``t`` as a :class:`Passthrough` of ``kind`` (non-float tensors are always raw)."""
    dtype = str(t.dtype).removeprefix("torch.")
    if not t.is_floating_point() or kind == "raw":
        return Passthrough(t.detach().clone(), "raw", dtype, tuple(t.shape))
    if kind == "fp16":
        return Passthrough(t.detach().to(torch.float16), "fp16", dtype, tuple(t.shape))
    if kind not in ("int8_tensor", "int8_row"):
        raise ConfigError(f"tensor {name!r}: unknown passthrough kind {kind!r}")
    flat = t.reshape(1, -1) if t.dim() == 0 else t
    per_row = kind == "int8_row" and t.dim() == 2
    q = quantize_rtn(
        flat,
        8,
        granularity="row" if per_row else "tensor",
        clip="absmax",
        scale_dtype=torch.float16 if per_row else torch.float32,
        name=name,
    )
    return Passthrough(q.codes.reshape(t.shape), kind, dtype, tuple(t.shape), q.scale.reshape(-1))


@dataclass
class Policy:
    """Ordered rules; the first match wins. Non-float tensors are always raw passthrough."""

    name: str
    rules: list[Rule]
    default: TensorSpec = field(default_factory=lambda: TensorSpec(method="passthrough"))

    def spec_for(self, name: str, tensor: torch.Tensor) -> TensorSpec:
        if not tensor.is_floating_point():
            return TensorSpec(method="passthrough", passthrough_dtype="raw")
        for rule in self.rules:
            if rule.matches(name, tensor):
                return rule.spec
        return self.default

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rules": [{**asdict(r), "spec": _spec_dict(r.spec)} for r in self.rules],
            "default": _spec_dict(self.default),
        }


def with_gptq_arithmetic(policy: Policy, arithmetic: str) -> Policy:
    """The same policy with every GPTQ rule's ``gptq_arithmetic`` set to ``arithmetic``."""
    rules = [
        dataclasses.replace(r, spec=dataclasses.replace(r.spec, gptq_arithmetic=arithmetic))
        if r.spec.method == "gptq"
        else r
        for r in policy.rules
    ]
    return Policy(policy.name, rules, policy.default)


def _spec_dict(spec: TensorSpec) -> dict:
    d = asdict(spec)
    d["clip_params"] = dict(spec.clip_params)
    return d


def _spec_from(d: Mapping, where: str) -> TensorSpec:
    if not isinstance(d, Mapping):
        raise ConfigError(f"policy {where}: a tensor spec must be a mapping, got {type(d).__name__}")
    unknown = sorted(str(k) for k in set(d) - {f.name for f in fields(TensorSpec)})
    if unknown:
        raise ConfigError(f"policy {where}: unknown tensor spec keys {unknown}")
    params = d.get("clip_params", {})
    if not isinstance(params, Mapping):
        raise ConfigError(f"policy {where}: clip_params must be a mapping, got {type(params).__name__}")
    try:
        return TensorSpec(**{**d, "clip_params": dict(params)})
    except ConfigError as exc:
        raise ConfigError(f"policy {where}: {exc}") from None


def policy_from_dict(d: Mapping) -> Policy:
    """Build a Policy from ``{"name", "rules": [{"pattern", "spec", "ndim"?, ...}], "default"?}``."""
    if not isinstance(d, Mapping) or not isinstance(d.get("rules"), list):
        raise ConfigError("policy: expected a mapping with a 'rules' list")
    if not isinstance(d.get("name", "custom"), str):
        raise ConfigError(f"policy: name must be a string, got {d.get('name')!r}")
    rules = []
    for i, r in enumerate(d["rules"]):
        if not isinstance(r, Mapping) or "pattern" not in r or "spec" not in r:
            raise ConfigError(f"policy rule {i}: needs 'pattern' and 'spec'")
        extra = set(r) - {"pattern", "spec", "ndim", "min_numel", "max_numel"}
        if extra:
            raise ConfigError(f"policy rule {i}: unknown keys {sorted(extra)}")
        cond = {k: r[k] for k in ("ndim", "min_numel", "max_numel") if k in r}
        rules.append(Rule(str(r["pattern"]), _spec_from(r["spec"], f"rule {i}"), **cond))
    default = _spec_from(d["default"], "default") if "default" in d else TensorSpec(method="passthrough")
    return Policy(str(d.get("name", "custom")), rules, default)


RECORD_STD_CORRECTION = 1  # the record's W.std(dim=1): Bessel (see qlab.quant.clip)


def _gptq(bits: int, k: float) -> TensorSpec:
    clip_params = {"k": k, "correction": RECORD_STD_CORRECTION}
    return TensorSpec(method="gptq", bits=bits, clip="sdclip", clip_params=clip_params)


_EMB = "tok_emb.weight"
_PASS = TensorSpec(method="passthrough", passthrough_dtype="fp16")
_CONTROL = ("*attn_scale", "*mlp_scale", "*resid_mix", "*q_gain", "skip_weights", "skip_gates")


@dataclass(frozen=True)
class RecordQuant:
    """The record's quantization settings, with its defaults: the one reader of its
    MATRIX_BITS, MATRIX_CLIP_SIGMAS, EMBED_BITS, EMBED_CLIP_SIGMAS,
    GPTQ_CALIBRATION_BATCHES and COMPRESSOR environment variables."""

    matrix_bits: int = 6
    matrix_k: float = 12.85
    embed_bits: int = 8
    embed_k: float = 20.0
    calib_batches: int = 64
    compressor: str = "brotli"

    ENV = {
        "MATRIX_BITS": ("matrix_bits", int),
        "MATRIX_CLIP_SIGMAS": ("matrix_k", float),
        "EMBED_BITS": ("embed_bits", int),
        "EMBED_CLIP_SIGMAS": ("embed_k", float),
        "GPTQ_CALIBRATION_BATCHES": ("calib_batches", int),
        "COMPRESSOR": ("compressor", str),
    }
    COMPRESSORS = ("brotli", "lzma")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RecordQuant:
        """Read the record's variables from ``env``; malformed values raise ConfigError by name."""
        out: dict[str, Any] = {}
        for var, (name, kind) in cls.ENV.items():
            if var in env:
                try:
                    out[name] = kind(env[var].strip())
                    if kind is float and not math.isfinite(out[name]):
                        raise ValueError
                except ValueError:
                    raise ConfigError(f"environment variable {var}={env[var]!r} is malformed") from None
        q = cls(**out)
        for var, bits in (("MATRIX_BITS", q.matrix_bits), ("EMBED_BITS", q.embed_bits)):
            if not 2 <= bits <= 8:
                raise ConfigError(f"environment variable {var}={bits} must lie in 2..8")
        if q.calib_batches < 0:
            raise ConfigError(f"environment variable GPTQ_CALIBRATION_BATCHES={q.calib_batches} must be >= 0")
        if q.compressor not in cls.COMPRESSORS:
            raise ConfigError(
                f"environment variable COMPRESSOR={q.compressor!r}: known {list(cls.COMPRESSORS)}"
            )
        return q


RECORD_POLICIES = ("record", "record_small", "record_pathA")


def record_policy(name: str = "record", quant: RecordQuant | None = None) -> Policy:
    """One of the record's policies with its knobs set (the record's defaults when ``quant`` is None)."""
    if name not in RECORD_POLICIES:
        raise ConfigError(f"record_policy: {name!r} is not one of {RECORD_POLICIES}")
    q = quant or RecordQuant()
    if name == "record_pathA":
        return _record_path_a(q)
    return _record(name, SMALL_CPU if name == "record_small" else SMALL, q)


def _record(name: str = "record", small: int = SMALL, q: RecordQuant = RecordQuant()) -> Policy:
    """The record's policy; ``small`` is the largest matrix kept as fp16 passthrough."""
    return Policy(
        name,
        [
            Rule(_EMB, _gptq(q.embed_bits, q.embed_k)),
            Rule("*", _gptq(q.matrix_bits, q.matrix_k), ndim=2, min_numel=small + 1),
            Rule("*", _PASS),
        ],
    )


def _record_path_a(q: RecordQuant = RecordQuant()) -> Policy:
    int8_t = TensorSpec(method="passthrough", passthrough_dtype="int8_tensor")
    int8_r = TensorSpec(method="passthrough", passthrough_dtype="int8_row")
    return Policy(
        "record_pathA",
        [
            Rule(_EMB, _gptq(q.embed_bits, q.embed_k)),
            Rule("*", _gptq(q.matrix_bits, q.matrix_k), ndim=2, min_numel=SMALL + 1),
            *[Rule(p, int8_t, max_numel=SMALL) for p in _CONTROL],
            Rule("*", int8_r, ndim=2, max_numel=SMALL),
            Rule("*", _PASS),
        ],
    )


def _per_category() -> Policy:
    return Policy(
        "per_category",
        [
            Rule(_EMB, _gptq(8, 15.0)),
            Rule("*.mlp.*", _gptq(6, 12.0), ndim=2, min_numel=SMALL + 1),
            Rule("*.attn.*", _gptq(6, 13.0), ndim=2, min_numel=SMALL + 1),
            Rule("*", _gptq(6, 12.85), ndim=2, min_numel=SMALL + 1),
            Rule("*", _PASS),
        ],
    )


def _rtn(bits: int) -> Policy:
    spec = TensorSpec(method="rtn", bits=bits, clip="absmax")
    return Policy(f"rtn_int{bits}", [Rule("*", spec, ndim=2, min_numel=SMALL + 1), Rule("*", _PASS)])


POLICIES = {
    "record": _record,
    "record_small": lambda: record_policy("record_small"),
    "record_pathA": _record_path_a,
    "per_category": _per_category,
    "rtn_int6": lambda: _rtn(6),
    "rtn_int8": lambda: _rtn(8),
}


def get_policy(name: str) -> Policy:
    """A fresh preset policy by name; unknown names raise ConfigError listing them."""
    if name not in POLICIES:
        raise ConfigError(f"unknown quantization policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]()


def _rtn_for(name: str, t: torch.Tensor, spec: TensorSpec, note: str | None = None) -> QuantizedTensor:
    q = quantize_rtn(
        t,
        spec.bits,
        symmetric=spec.symmetric,
        granularity=spec.granularity,
        group_size=spec.group_size,
        clip=spec.clip,
        clip_params=spec.clip_params,
        name=name,
    )
    if note:
        q.meta["note"] = note
    return q


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    policy: Policy,
    hessians: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, QuantizedTensor | Passthrough]:
    """Quantize every tensor by the policy; GPTQ tensors are batched by spec.

    A GPTQ tensor without a Hessian falls back to RTN with the same bits and clip
    (``meta["note"]`` says so). The result keeps the state dict's order.
    """
    hessians = hessians or {}
    out: dict[str, QuantizedTensor | Passthrough] = {}
    gptq_groups: dict[TensorSpec, list[str]] = {}
    for name, t in tqdm(state_dict.items(), desc="quantize", disable=not progress):
        spec = policy.spec_for(name, t)
        if spec.method == "passthrough":
            out[name] = make_passthrough(t, spec.passthrough_dtype, name)
        elif spec.method == "rtn":
            out[name] = _rtn_for(name, t, spec)
        elif name in hessians:
            gptq_groups.setdefault(_hashable(spec), []).append(name)
        else:
            out[name] = _rtn_for(name, t, spec, note="gptq requested but no Hessian: RTN fallback")
    for spec, names in gptq_groups.items():
        if spec.granularity != "row" or not spec.symmetric:
            raise ConfigError(f"GPTQ supports symmetric per-row scales only (tensors {names})")
        res = gptq_quantize_many(
            {n: state_dict[n] for n in names},
            {n: hessians[n] for n in names},
            bits=spec.bits,
            clip_rule=spec.clip,
            clip_params=dict(spec.clip_params),
            arithmetic=spec.gptq_arithmetic,
            rate_lambda=spec.gptq_rate_lambda,
            progress=progress,
        )
        out.update(res)
    count = MatrixCount()
    for name, t in state_dict.items():
        count.add(t, isinstance(out[name], QuantizedTensor))
    count.warn(policy.name)
    return {name: out[name] for name in state_dict}  # the state dict's order


class NothingQuantizedWarning(UserWarning):
    """A policy left every matrix of a state dict in floating point."""


@dataclass
class MatrixCount:
    """How many 2-D float tensors a policy met and how many it quantized (for the warning)."""

    matrices: int = 0
    quantized: int = 0
    largest: int = 0

    def add(self, t: torch.Tensor, quantized: bool) -> None:
        if t.ndim == 2 and t.is_floating_point():
            self.matrices += 1
            self.quantized += int(quantized)
            self.largest = max(self.largest, t.numel())

    def warn(self, policy_name: str) -> None:
        """Warn (NothingQuantizedWarning) when matrices were met and none was quantized."""
        if self.matrices and not self.quantized:
            warnings.warn(
                f"policy {policy_name!r} leaves all {self.matrices} matrices unquantized (the largest "
                f"has {self.largest:,} elements, under its size threshold); for a small model try "
                "'record_small'",
                NothingQuantizedWarning,
                stacklevel=3,
            )


def _hashable(spec: TensorSpec) -> TensorSpec:
    """TensorSpec with clip_params as a sorted tuple so it can key a dict."""
    return TensorSpec(**{**asdict(spec), "clip_params": _FrozenParams(spec.clip_params)})


class _FrozenParams(dict):
    """A dict usable as (part of) a dict key; only built from already-valid params."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(repr(sorted(self.items())))  # repr: values may be lists (from JSON)


def dequantize_state_dict(
    qsd: Mapping[str, QuantizedTensor | Passthrough], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Back to plain tensors, each in ``dtype`` or its original dtype (``meta["dtype"]``)."""
    out = {}
    for name, q in qsd.items():
        if isinstance(q, Passthrough):
            out[name] = q.dequantize(dtype)
        elif isinstance(q, QuantizedTensor):
            target = dtype or dtype_from_name(q.meta.get("dtype", "float32"), f"tensor {name!r}")
            out[name] = dequantize(q, target)
        else:
            raise QuantError(f"tensor {name!r}: cannot dequantize a {type(q).__name__}")
    return out


def resolve_policy(policy: str | os.PathLike | Policy | Mapping) -> Policy:
    """qlab's one policy resolver: a Policy as is, a mapping (``policy_from_dict``), a
    preset name, or a ``.json`` / ``.yaml`` policy file (``load_policy``)."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return policy_from_dict(policy)
    if isinstance(policy, (str, os.PathLike)):
        return load_policy(policy)
    raise ConfigError(
        f"policy must be a preset name, a policy file, a Policy or a mapping, got {type(policy).__name__}"
    )


def load_policy(spec: str | os.PathLike) -> Policy:
    """A preset by name, or a policy file (.json, .yaml/.yml) read by ``policy_from_dict``."""
    path = Path(spec)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        return get_policy(str(spec))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"policy file {path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"policy file {path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"policy file {path}: invalid JSON ({exc})") from exc
        except RecursionError:
            raise ConfigError(f"policy file {path}: JSON nested too deeply") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"policy file {path}: invalid YAML{at} ({problem})") from None
        except RecursionError:
            raise ConfigError(f"policy file {path}: YAML nested too deeply") from None
    return policy_from_dict(data)
