"""The reg × quant grid spec: bases × regularizer variants × seeds, evaluated under many schemes.

A spec file (TOML, or YAML via pyyaml) looks like::

    name = "smoke"
    seeds = [0, 1]
    variants = ["ES=0.05", "QAHSP_GRID=0.3", "QAHSP_GRID=0.15+ES=0.03"]   # "no-reg" is added

    [bases.A]                      # one table per base (a training configuration)
    preset = "tiny"                # model + train preset (qlab.train.config.resolve_configs)
    data = "embedded"              # dataset directory (relative to the spec file) or "embedded"
    model = { model_dim = 32, num_layers = 2 }
    train = { iterations = 30, train_seq_len = 64 }

    [quant]
    hidden_schemes = "all"         # PR #2011's seven hidden-state schemes, or a list of names
    hidden_tokens = 128            # rows of the fixed final-hidden-state batch
    weight_policies = ["rtn_int6"] # qlab.quant.policy presets or names from [quant.policies]
    [quant.policies.int4_all]      # inline policies, qlab.quant.policy.policy_from_dict format
    rules = [{ pattern = "*", ndim = 2, spec = { method = "rtn", bits = 4, clip = "absmax" } }]

    [eval]
    val_max_tokens = 8193          # 0 = the whole validation split
    sliding_stride = 32            # omit for no sliding-window stage
    calibration_seqs = 0           # > 0: GPTQ Hessians from this many training sequences
    [eval.ttt]                     # omit for no TTT stage; fields of qlab.eval.ttt.TTTConfig
    chunk_tokens = 2048

A cell is one (base, variant, seed): it is trained once and evaluated under every weight
policy and hidden-state scheme. Its id is readable (``A-ES0.05-s0``) plus a short hash of
everything that shapes the trained weights, so editing a base's config gives new cells
rather than silently reusing stale ones. TOML needs Python ≥ 3.11 (``tomllib``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlab.analysis.hidden_quant import HIDDEN_SCHEMES
from qlab.checks import is_int as _is_int
from qlab.config import ModelConfig
from qlab.errors import ConfigError
from qlab.eval.ttt import TTTConfig
from qlab.quant.policy import resolve_policy
from qlab.train.config import resolve_configs
from qlab.train.regularizers import canonical_name, parse_reg_spec

__all__ = [
    "CONTROL",
    "BaseSpec",
    "Variant",
    "EvalSpec",
    "MatrixSpec",
    "Cell",
    "parse_variant",
    "load_spec",
    "spec_from_dict",
    "plan_cells",
    "parse_shard",
    "shard_cells",
]

CONTROL = "no-reg"
_CONTROL_ALIASES = {"", "none", "no-reg", "noreg", "control"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# TrainConfig fields that do not change the trained weights (left out of the cell hash).
# Data paths are left out too, so a results folder survives moving to another machine.
_NOT_IDENTITY = {
    "out_dir",
    "device",
    "compile",
    "log_every",
    "val_every",
    "checkpoint_every",
    "val_max_tokens",
    "val_batch_seqs",
    "eval_stride",
    "data",
    "tokenizer_path",
}
_TOP_KEYS = {"name", "seeds", "variants", "control", "bases", "quant", "eval", "device"}
_BASE_KEYS = {"preset", "data", "model", "train"}
_QUANT_KEYS = {"hidden_schemes", "hidden_tokens", "hidden_offset", "weight_policies", "policies"}
_EVAL_KEYS = {"val_max_tokens", "batch_seqs", "sliding_stride", "calibration_seqs", "ttt"}


@dataclass(frozen=True)
class Variant:
    """A set of regularizers with weights; ``regs == {}`` is the no-regularizer control."""

    label: str  # e.g. "no-reg", "ES=0.05", "QAHSP=0.15+ES=0.03"
    regs: tuple[tuple[str, float], ...]

    @property
    def is_control(self) -> bool:
        return not self.regs

    @property
    def reg_names(self) -> str:
        """Papers' ``regs`` column: names joined by "+" ("" for the control)."""
        return "+".join(n for n, _ in self.regs)

    @property
    def lam(self) -> float:
        """Papers' ``lambda`` column: the weight of a single regularizer, NaN otherwise."""
        return self.regs[0][1] if len(self.regs) == 1 else math.nan

    @property
    def lambdas(self) -> str:
        """Papers' ``lambdas`` column: "QAHSP=0.15,ES=0.03"."""
        return ",".join(f"{n}={w:g}" for n, w in self.regs)

    @property
    def slug(self) -> str:
        return "no-reg" if self.is_control else "+".join(f"{n}{w:g}" for n, w in self.regs)


@dataclass(frozen=True)
class BaseSpec:
    """One training configuration: a preset plus model/train overrides and a dataset."""

    name: str
    preset: str = "tiny"
    data: str = "embedded"
    model: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSpec:
    """What each cell measures after training (see the module docstring)."""

    hidden_schemes: tuple[str, ...] = tuple(HIDDEN_SCHEMES)
    hidden_tokens: int = 128
    hidden_offset: int = 0
    weight_policies: tuple[str, ...] = ("rtn_int6",)
    policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # inline policies by name
    val_max_tokens: int = 0
    batch_seqs: int = 16
    sliding_stride: int | None = None
    calibration_seqs: int = 0
    ttt: Mapping[str, Any] | None = None

    def key(self) -> str:
        """Hash of every evaluation setting: cells whose results carry another key are re-evaluated."""
        return _hash(_plain(self.__dict__))


@dataclass(frozen=True)
class MatrixSpec:
    name: str
    bases: tuple[BaseSpec, ...]
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    eval: EvalSpec
    root: Path = Path(".")  # directory relative data paths are resolved against
    device: str = "auto"

    def base(self, name: str) -> BaseSpec:
        for b in self.bases:
            if b.name == name:
                return b
        raise ConfigError(f"matrix spec {self.name!r} has no base {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (what ``qlab matrix run`` stores beside the results)."""
        return _plain(
            {
                "name": self.name,
                "seeds": list(self.seeds),
                "variants": [v.label for v in self.variants],
                "bases": {b.name: {k: v for k, v in b.__dict__.items() if k != "name"} for b in self.bases},
                "eval": self.eval.__dict__,
                "device": self.device,
            }
        )


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    cell_id: str
    base: str
    variant: Variant
    seed: int


# ---- parsing --------------------------------------------------------------------------------


def parse_variant(text: str) -> Variant:
    """ "QAHSP=0.3+ES=0.05" → Variant with canonical regularizer names; "no-reg"/"" → the control."""

    if not isinstance(text, str):
        raise ConfigError(f"matrix variant must be a string like 'ES=0.05', got {text!r}")
    if text.strip().lower() in _CONTROL_ALIASES:
        return Variant(CONTROL, ())
    regs: list[tuple[str, float]] = []
    for part in text.split("+"):
        name, weight = parse_reg_spec(part.strip())
        if any(n == name for n, _ in regs):
            raise ConfigError(f"matrix variant {text!r} names regularizer {name} twice")
        if weight == 0:
            raise ConfigError(f"matrix variant {text!r}: weight 0 for {name} (use 'no-reg' for the control)")
        regs.append((name, weight))
    label = "+".join(f"{n}={w:g}" for n, w in regs)
    return Variant(label, tuple(regs))


def load_spec(path: str | Path) -> MatrixSpec:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) grid spec."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"matrix spec {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"matrix spec {path}: expected a .toml, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'TOML' if suffix == '.toml' else 'YAML'}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a grid spec") from None
    _refuse_empty_tables(data, str(path))
    return spec_from_dict(data, root=path.parent, where=str(path))


def _refuse_empty_tables(data: Any, where: str, key: str = "") -> None:
    """A table header with nothing under it (``[eval]`` as a file's last line) is a file cut
    at a table boundary, not a request for the defaults: refused, naming the table."""
    if not isinstance(data, Mapping):
        return
    if not data and key:
        raise ConfigError(
            f"{where}: {key} is an empty table; give it keys or remove it (is the file cut short?)"
        )
    for k, v in data.items():
        _refuse_empty_tables(v, where, f"{key}.{k}" if key else str(k))


def spec_from_dict(data: Any, root: str | Path = ".", where: str = "matrix spec") -> MatrixSpec:
    """Validate a parsed spec mapping; every problem raises ConfigError naming the field."""
    d = _table(data, where, _TOP_KEYS)
    bases = tuple(
        _base(n, b, f"{where}: bases.{n}") for n, b in _table(d.get("bases"), f"{where}: bases").items()
    )
    if not bases:
        raise ConfigError(f"{where}: needs at least one base under [bases]")
    variants = _variants(d.get("variants", []), d.get("control", True), where)
    seeds = d.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds {seeds} repeat a value")
    name = d.get("name", Path(where).stem)
    device = d.get("device", "auto")
    if not isinstance(name, str) or not isinstance(device, str):
        raise ConfigError(f"{where}: name and device must be strings")
    spec = MatrixSpec(
        name=name,
        bases=bases,
        variants=variants,
        seeds=tuple(seeds),
        eval=_eval(d.get("quant"), d.get("eval"), where),
        root=Path(root),
        device=device,
    )
    plan_cells(spec)  # resolves every configuration once, so errors surface here
    return spec


def _table(obj: Any, where: str, keys: set[str] | None = None, optional: bool = True) -> dict[str, Any]:
    # An absent section means "defaults"; an explicit null (a truncated file, a typo'd
    # key with no value) does not, or a damaged spec would silently run the defaults.
    if obj is None and optional:
        return {}
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where} must be a table/mapping, got {type(obj).__name__}")
    if keys is not None and set(obj) - keys:
        raise ConfigError(f"{where}: unknown key(s) {sorted(set(obj) - keys)}; allowed: {sorted(keys)}")
    return dict(obj)


def _base(name: str, obj: Any, where: str) -> BaseSpec:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: base names may use letters, digits, '_', '.', '-' only")
    if obj is None:
        raise ConfigError(f"{where} is empty (null): a base needs at least its preset")
    b = _table(obj, where, _BASE_KEYS)
    for key in ("preset", "data"):
        if key in b and not isinstance(b[key], str):
            raise ConfigError(f"{where}.{key} must be a string, got {b[key]!r}")
    model, train = (_table(b.get(key), f"{where}.{key}") for key in ("model", "train"))
    if "seed" in train:
        raise ConfigError(f"{where}.train: set seeds via the top-level 'seeds' list")
    _base_regs(train.get("regs", {}), where)
    return BaseSpec(
        name=name, preset=b.get("preset", "tiny"), data=b.get("data", "embedded"), model=model, train=train
    )


def _base_regs(regs: Any, where: str) -> dict[str, float]:
    """A base's own regularizers (part of the base, e.g. PR #2011's base A trains with SimCTG)."""

    if not isinstance(regs, Mapping):
        raise ConfigError(f"{where}.train.regs must be a table NAME = weight")
    out = {}
    for name, w in regs.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"{where}.train.regs.{name} must be a finite number, got {w!r}")
        out[canonical_name(name)] = float(w)
    return out


def _variants(items: Any, control: Any, where: str) -> tuple[Variant, ...]:
    if not isinstance(items, list):
        raise ConfigError(f"{where}: variants must be a list of strings like 'ES=0.05'")
    if not isinstance(control, bool):
        raise ConfigError(f"{where}: control must be true or false")
    parsed = [parse_variant(v) for v in items]
    if control and not any(v.is_control for v in parsed):
        parsed.insert(0, Variant(CONTROL, ()))
    seen: dict[tuple, str] = {}
    for v in parsed:
        key = tuple(sorted(v.regs))
        if key in seen:
            raise ConfigError(f"{where}: variants {seen[key]!r} and {v.label!r} train the same model")
        seen[key] = v.label
    if not parsed:
        raise ConfigError(f"{where}: no variants to run")
    return tuple(parsed)


def _eval(quant: Any, ev: Any, where: str) -> EvalSpec:
    q = _table(quant, f"{where}: quant", _QUANT_KEYS)
    e = _table(ev, f"{where}: eval", _EVAL_KEYS)
    schemes = q.get("hidden_schemes", "all")
    schemes = list(HIDDEN_SCHEMES) if schemes == "all" else schemes
    if not isinstance(schemes, list) or not all(s in HIDDEN_SCHEMES for s in schemes):
        raise ConfigError(
            f"{where}: quant.hidden_schemes must be 'all' or a list from {list(HIDDEN_SCHEMES)}"
        )
    policies = {
        n: _table(p, f"{where}: quant.policies.{n}")
        for n, p in _table(q.get("policies"), f"{where}: quant.policies").items()
    }
    weight = q.get("weight_policies", ["rtn_int6"])
    if not isinstance(weight, list) or not weight or not all(isinstance(p, str) for p in weight):
        raise ConfigError(f"{where}: quant.weight_policies must be a non-empty list of policy names")
    for p in weight:
        _resolve_policy(p, policies)  # raises for unknown names
    ttt = e.get("ttt")
    if ttt is not None:
        ttt = _table(ttt, f"{where}: eval.ttt")
        bad = set(ttt) & {"seq_len", "stride", "max_tokens"}
        if bad:
            raise ConfigError(f"{where}: eval.ttt.{sorted(bad)} follow the base and [eval]; remove them")
        try:
            TTTConfig(**ttt)
        except TypeError as exc:
            raise ConfigError(f"{where}: eval.ttt has an unknown field ({exc})") from exc
    out = EvalSpec(
        hidden_schemes=tuple(schemes),
        hidden_tokens=q.get("hidden_tokens", 128),
        hidden_offset=q.get("hidden_offset", 0),
        weight_policies=tuple(weight),
        policies=policies,
        val_max_tokens=e.get("val_max_tokens", 0),
        batch_seqs=e.get("batch_seqs", 16),
        sliding_stride=e.get("sliding_stride"),
        calibration_seqs=e.get("calibration_seqs", 0),
        ttt=ttt,
    )
    for name in ("hidden_tokens", "batch_seqs"):
        if not (_is_int(getattr(out, name)) and getattr(out, name) >= 2):
            raise ConfigError(f"{where}: {name} must be an integer ≥ 2, got {getattr(out, name)!r}")
    for name in ("hidden_offset", "val_max_tokens", "calibration_seqs"):
        if not (_is_int(getattr(out, name)) and getattr(out, name) >= 0):
            raise ConfigError(f"{where}: {name} must be an integer ≥ 0, got {getattr(out, name)!r}")
    if out.sliding_stride is not None and not (_is_int(out.sliding_stride) and out.sliding_stride > 0):
        raise ConfigError(
            f"{where}: eval.sliding_stride must be a positive integer, got {out.sliding_stride!r}"
        )
    return out


def _resolve_policy(name: str, inline: Mapping[str, Mapping[str, Any]]):
    if name in inline:
        return resolve_policy({"name": name, **inline[name]})
    return resolve_policy(name)


def spec_policy(spec: MatrixSpec, name: str):
    """The :class:`qlab.quant.policy.Policy` a spec calls ``name`` (inline first, then presets)."""
    return _resolve_policy(name, spec.eval.policies)


# ---- cells --------------------------------------------------------------------------------


def resolve_base(spec: MatrixSpec, base: BaseSpec, variant: Variant, seed: int, out_dir: str = "."):
    """(TrainConfig, ModelConfig) of one cell: preset → base overrides → regs, seed, data, device."""

    data = base.data if base.data == "embedded" else str((spec.root / base.data).resolve())
    fixed = _base_regs(base.train.get("regs", {}), f"base {base.name!r}")
    clash = sorted(set(fixed) & {n for n, _ in variant.regs})
    if clash:
        raise ConfigError(
            f"base {base.name!r} already trains with {clash}; variant {variant.label!r} repeats it"
        )
    regs = {**fixed, **dict(variant.regs)}
    train = {**base.train, "regs": regs, "seed": seed, "data": data, "out_dir": out_dir}
    train.setdefault("device", spec.device)
    try:
        return resolve_configs(base.preset, train, base.model, env={})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"base {base.name!r}: bad model/train override ({exc})") from exc


def cell_key(train_dict: Mapping[str, Any], model: ModelConfig) -> str:
    """Hash of everything that shapes the trained weights."""
    ident = {k: v for k, v in train_dict.items() if k not in _NOT_IDENTITY}
    return _hash({"train": _plain(ident), "model": _plain(model.to_dict())})


def plan_cells(spec: MatrixSpec) -> list[Cell]:
    """Every (base, variant, seed) of the grid as a Cell, sorted by cell id."""
    cells = []
    for base in spec.bases:
        for variant in spec.variants:
            for seed in spec.seeds:
                train, model = resolve_base(spec, base, variant, seed)
                key = cell_key(train.to_dict(), model)[:8]
                cells.append(Cell(f"{base.name}-{variant.slug}-s{seed}-{key}", base.name, variant, seed))
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"matrix spec {spec.name!r}: two cells share an id (repeated base or variant)")
    return sorted(cells, key=lambda c: c.cell_id)


def cell_at(spec: MatrixSpec, index: int) -> Cell:
    """The ``index``-th cell of :func:`plan_cells` (sorted by id: stable across machines,
    so array task i always runs the same cell)."""
    cells = plan_cells(spec)
    if not 0 <= index < len(cells):
        raise ConfigError(
            f"cell index {index} is outside the grid's {len(cells)} cells (0 … {len(cells) - 1})"
        )
    return cells[index]


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" (0 ≤ i < n, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) → (i, n)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"--shard {text!r} must look like i/n, e.g. 0/8")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 ≤ i < n")
    return i, n


def shard_cells(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """Round-robin on the sorted cell ids: shard i of n gets cells i, i+n, i+2n, …"""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count}: need 0 ≤ i < n")
    return sorted(cells, key=lambda c: c.cell_id)[index::count]


# ---- helpers ----------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """JSON-ready copy: tuples → lists, Paths → str, mappings → dicts with sorted keys."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_plain(obj), sort_keys=True).encode()).hexdigest()
