"""Read any checkpoint tensor by tensor, with bounded memory.

``qlab entropy``, ``qlab fingerprint`` and ``qlab quantize`` accept whatever a user has:
a qlab run directory, a safetensors file, a Hugging Face directory (sharded or not,
safetensors or ``.bin``), a torch ``.pt``/``.pth``/``.bin`` state dict, a Parameter Golf
``.ptz`` artifact or a qlab ``.qlab`` artifact. :func:`detect_format` names which,
:func:`list_tensors` reads headers only where the format allows, and
:func:`iter_tensors` yields one tensor at a time (in storage order) so the resident set
stays around the size of the largest tensor for safetensors-based checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qlab.checks import all_finite, parse_json
from qlab.compress.container import read_artifact
from qlab.compress.ptz import decode_pg_tree, read_ptz
from qlab.errors import CheckpointError, QlabError
from qlab.io.checkpoint import committed_file, verify_weights
from qlab.io.formats import (
    dtype_from_name,
    load_torch_file,
    normalize_tensor,
    read_safetensors_header,
    read_safetensors_tensor,
    release_pages,
)
from qlab.quant.policy import Passthrough
from qlab.quant.tensor import QuantizedTensor, dequantize

__all__ = ["FORMATS", "TensorInfo", "detect_format", "list_tensors", "iter_tensors", "load_state_dict"]

FORMATS = ("qlab-run", "safetensors", "hf-sharded", "torch", "ptz", "qlab-artifact")

_SUPPORTED = (
    "supported: a qlab run directory (config.json + model.safetensors), a .safetensors file, "
    "a Hugging Face directory (model.safetensors[.index.json] or pytorch_model.bin[.index.json]), "
    "a torch .pt/.pth/.bin/.ckpt state dict, a Parameter Golf .ptz artifact, a qlab .qlab artifact"
)
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_Stream = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorInfo:
    """What :func:`list_tensors` knows about a tensor without reading its data.

    ``dtype`` is the stored dtype (e.g. ``"bfloat16"``, ``"float8_e4m3fn"``), except for
    quantized artifact entries, listed as the ``"float32"`` tensors they dequantize to;
    ``source`` is the file (shard) holding it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    source: str


# --------------------------------------------------------------------------- detection


def detect_format(path: str | os.PathLike) -> str:
    """Name the checkpoint format of ``path`` (one of :data:`FORMATS`) or raise CheckpointError."""
    p = Path(path)
    if p.is_dir():
        return _detect_dir(p)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file or directory ({_SUPPORTED})")
    if p.name.endswith(".index.json"):
        return "hf-sharded"
    magic = _head(p, 9)
    if magic[:4] == b"QLAB" or p.suffix == ".qlab":
        return "qlab-artifact"
    if p.suffix == ".ptz":
        return "ptz"
    if p.suffix == ".safetensors":
        return "safetensors"
    if p.suffix in _TORCH_SUFFIXES:
        return "torch"
    if magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80":  # torch zip / legacy pickle
        return "torch"
    if len(magic) == 9 and magic[8:9] == b"{":  # u64 header length then a JSON object
        return "safetensors"
    raise CheckpointError(f"{p}: unrecognised checkpoint format ({_SUPPORTED})")


def _head(p: Path, n: int) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e}") from e


def _run_file(run_dir: Path, name: str) -> Path:
    """Where a run directory's committed ``name`` is (a complete staging folder is newer)."""
    return committed_file(run_dir, name)  # one definition of the commit protocol


def _detect_dir(p: Path) -> str:
    if _run_file(p, "model.safetensors").is_file() and _is_qlab_config(_run_file(p, "config.json")):
        return "qlab-run"
    if _hf_sources(p, parse_index=False):
        return "hf-sharded"
    raise CheckpointError(f"{p}: directory holds no checkpoint qlab can read ({_SUPPORTED})")


def _is_qlab_config(cfg: Path) -> bool:
    # A Hugging Face config.json also sits beside model.safetensors; qlab's has these keys.
    if not cfg.is_file():
        return False
    try:
        data = parse_json(cfg.read_bytes(), str(cfg), CheckpointError)
    except (OSError, CheckpointError):
        return False
    return isinstance(data, dict) and ("qlab_version" in data or {"model", "train"} <= data.keys())


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """One file to read; ``names`` are the tensors it must provide (None: all it holds)."""

    kind: str  # "safetensors" | "torch" | "ptz" | "qlab"
    file: Path
    names: list[str] | None = None


def _sources(path: Path, fmt: str) -> list[_Source]:
    if fmt == "qlab-run":
        return [_Source("safetensors", verify_weights(path))]
    if fmt == "hf-sharded":
        return _hf_sources(path.parent if path.is_file() else path, index=path)
    kind = {"safetensors": "safetensors", "torch": "torch", "ptz": "ptz", "qlab-artifact": "qlab"}[fmt]
    return [_Source(kind, path)]


def _hf_sources(d: Path, index: Path | None = None, parse_index: bool = True) -> list[_Source]:
    """Files of a Hugging Face directory, preferring safetensors over torch ``.bin``.

    With ``parse_index=False`` (detection only) a shard index is not read or checked.
    """
    if index is not None and index.is_file():
        return _index_sources(index)
    for idx in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / idx).is_file():
            return _index_sources(d / idx) if parse_index else [_Source("torch", d / idx)]
    for single, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch")):
        if (d / single).is_file():
            return [_Source(kind, d / single)]
    st = sorted(d.glob("*.safetensors"))
    if st:
        return [_Source("safetensors", f) for f in st]
    # training_args.bin (Hugging Face Trainer) is a pickled config object, not weights.
    return [_Source("torch", f) for f in sorted(d.glob("*.bin")) if f.name != "training_args.bin"]


def _index_sources(index: Path) -> list[_Source]:
    try:
        text = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read the shard index ({e.strerror})") from e
    data = parse_json(text, f"{index}: shard index", CheckpointError)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: shard index needs a 'weight_map' object (tensor name -> shard file)")
    by_shard: dict[str, list[str]] = {}
    for name, shard in wm.items():
        by_shard.setdefault(shard, []).append(name)
    out = []
    root = index.parent.resolve()
    for shard, names in by_shard.items():
        f = index.parent / shard
        # The index decides which files are read: never outside its own folder.
        if Path(shard).is_absolute() or root not in (root / shard).resolve().parents:
            raise CheckpointError(f"{index}: shard {shard!r} lies outside the checkpoint folder")
        if not f.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} listed in the weight_map is missing ({f})")
        kind = "safetensors" if f.suffix == ".safetensors" else "torch"
        out.append(_Source(kind, f, names))
    return out


# --------------------------------------------------------------------------- per-kind readers


def _safetensors_entries(src: _Source) -> list:
    entries = read_safetensors_header(src.file)
    if src.names is None:
        return entries
    have = {e.name for e in entries}
    missing = [n for n in src.names if n not in have]
    if missing:
        raise CheckpointError(f"{src.file}: tensors listed in the shard index are missing: {missing[:5]}")
    wanted = set(src.names)
    return [e for e in entries if e.name in wanted]


def _iter_safetensors(src: _Source, wanted: set[str] | None) -> _Stream:
    entries = [e for e in _safetensors_entries(src) if wanted is None or e.name in wanted]
    with open(src.file, "rb", buffering=0) as f:
        for e in entries:
            yield e.name, read_safetensors_tensor(f, e, src.file)


def _load_whole(
    src: _Source, raw_codes: bool = False
) -> tuple[dict[str, torch.Tensor | QuantizedTensor], bool]:
    """Whole-file formats: torch (memory-mapped), .ptz and .qlab (small compressed artifacts).

    Returns the name -> tensor (or QuantizedTensor) dict and whether its tensors live
    in a file mapping.
    """
    mapped = False
    raw: Mapping[str, object]
    if src.kind == "torch":
        raw, mapped = load_torch_file(src.file)
    elif src.kind == "ptz":
        raw = _read_ptz(src.file, raw_codes)
    else:
        raw = _read_qlab(src.file)
    sd: dict[str, torch.Tensor | QuantizedTensor] = {}
    for name, v in raw.items():
        if not isinstance(v, (torch.Tensor, QuantizedTensor)):
            raise CheckpointError(f"{src.file}: entry {name!r} is a {type(v).__name__}, not a tensor")
        sd[name] = v
    if src.names is not None:
        missing = [n for n in src.names if n not in sd]
        if missing:
            raise CheckpointError(f"{src.file}: tensors listed in the shard index are missing: {missing[:5]}")
        sd = {n: sd[n] for n in src.names}
    return sd, mapped


def _read_ptz(path: Path, raw_codes: bool) -> dict[str, torch.Tensor]:
    return decode_pg_tree(_wrap(read_ptz, path), path, raw_codes)


def _read_qlab(path: Path) -> dict[str, object]:
    return _as_tensor_dict(_wrap(read_artifact, path), path)


def _wrap(fn, path: Path) -> object:
    try:
        return fn(path)
    except CheckpointError:
        raise
    except QlabError as e:  # ArtifactError etc.: same message, the type callers catch here
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from e


def _as_tensor_dict(obj: object, path: Path) -> dict[str, object]:
    """``read_artifact``'s entries as tensors (QuantizedTensors stay, for codes or dequantizing)."""
    if isinstance(obj, tuple):  # (entries, header)
        obj = obj[0]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors, got {type(obj).__name__}")
    return {name: _artifact_value(v) for name, v in obj.items()}


def _artifact_value(v: object) -> object:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    if isinstance(v, Passthrough):
        # int8 passthroughs (record_pathA) hold codes and a scale: their value is the product.
        try:
            return v.dequantize()
        except (QlabError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"passthrough entry cannot be dequantized ({exc})") from None
    if dataclasses.is_dataclass(v) and not isinstance(v, (type, QuantizedTensor)):
        # Passthrough-style wrappers: the one tensor they hold is the value.
        tensors = [x for f in dataclasses.fields(v) if isinstance(x := getattr(v, f.name), torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    return v  # a tensor, a QuantizedTensor, or something _load_whole rejects by name


def _iter_whole(src: _Source, wanted: set[str] | None, raw_codes: bool, strict: bool) -> _Stream:
    sd, mapped = _load_whole(src, raw_codes)
    if strict and wanted is not None:  # the only source: unknown names fail before yielding
        _check_known(src.file, wanted, set(sd))
    for name in [n for n in sd if wanted is None or n in wanted]:
        v = sd.pop(name)  # drop our reference as we go
        if not isinstance(v, torch.Tensor):
            yield name, (v.codes if raw_codes else _dequantize(v, name, src.file))
        elif mapped:
            # Copy out of the file mapping, then hand its pages back: RSS stays bounded.
            out = v.clone()
            release_pages(v)
            yield name, out
        else:
            yield name, v


def _dequantize(q: QuantizedTensor, name: str, file: Path) -> torch.Tensor:
    try:
        return dequantize(q)
    except QlabError as e:
        raise CheckpointError(f"{file}: tensor {name!r} cannot be dequantized: {e}") from e


def _iter_source(src: _Source, wanted: set[str] | None, raw_codes: bool, strict: bool) -> _Stream:
    if src.kind == "safetensors":
        return _iter_safetensors(src, wanted)
    return _iter_whole(src, wanted, raw_codes, strict)


def _infos(src: _Source) -> list[TensorInfo]:
    if src.kind == "safetensors":
        return [
            TensorInfo(e.name, e.shape, _dtype_name(e.torch_dtype), e.numel, str(src.file))
            for e in _safetensors_entries(src)
        ]
    out = []
    for name, v in _load_whole(src)[0].items():
        if isinstance(v, torch.Tensor):
            out.append(TensorInfo(name, tuple(v.shape), _dtype_name(v.dtype), v.numel(), str(src.file)))
        else:  # a QuantizedTensor, listed as what iter_tensors yields for it
            out.append(TensorInfo(name, tuple(v.shape), "float32", v.numel(), str(src.file)))
    return out


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# --------------------------------------------------------------------------- public API


def list_tensors(path: str | os.PathLike) -> list[TensorInfo]:
    """Names, shapes and dtypes of every tensor, in storage order.

    Safetensors-based formats read headers only; torch files are memory-mapped (no data
    read); ``.ptz`` and ``.qlab`` artifacts must be decompressed. Quantized entries of
    artifacts are listed as the float32 tensors :func:`iter_tensors` yields for them.
    """
    p = Path(path)
    return [info for src in _sources(p, detect_format(p)) for info in _infos(src)]


def iter_tensors(
    path: str | os.PathLike,
    *,
    names: Iterable[str] | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    check_finite: bool = True,
    raw_codes: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, in storage order, each an owned CPU tensor.

    ``names`` restricts to a subset (an unknown name raises CheckpointError, before any
    data is read where headers or a shard index list the names); ``dtype`` casts
    floating tensors (integer and bool tensors keep theirs); fp8 is widened to float32.
    With ``check_finite`` a tensor holding NaN/Inf raises a CheckpointError naming it
    (checked before any cast). ``raw_codes`` yields the integer codes of quantized
    artifact entries instead of their dequantized values. Format errors and unknown
    names are raised by this call itself, not on the first ``next()``.
    """
    p = Path(path)
    cast = _resolve_dtype(dtype)
    sources = _sources(p, detect_format(p))
    wanted = None if names is None else {names} if isinstance(names, str) else set(names)
    known = _known_names(sources)
    if wanted is not None and known is not None:
        _check_known(p, wanted, known)
    total = len(wanted) if wanted is not None else (len(known) if known is not None else None)
    return _stream(p, sources, wanted, cast, progress, check_finite, raw_codes, total)


def _stream(
    p: Path,
    sources: list[_Source],
    wanted: set[str] | None,
    cast: torch.dtype | None,
    progress: bool,
    check_finite: bool,
    raw_codes: bool,
    total: int | None,
) -> _Stream:
    seen: set[str] = set()
    strict = len(sources) == 1
    with tqdm(total=total, disable=not progress, unit="tensor", desc=p.name) as bar:
        for src in sources:
            for name, t in _iter_source(src, wanted, raw_codes, strict):
                seen.add(name)
                yield name, _finish(t, name, src.file, cast, check_finite)
                bar.update(1)
    if wanted is not None:  # formats whose names are only known after reading everything
        _check_known(p, wanted, seen)


def _known_names(sources: list[_Source]) -> set[str] | None:
    """Tensor names knowable without reading data: from a shard index or safetensors headers."""
    if all(s.names is not None for s in sources):
        return {n for s in sources for n in s.names or ()}
    if all(s.kind == "safetensors" for s in sources):
        return {e.name for s in sources for e in _safetensors_entries(s)}
    return None


def _check_known(p: Path, wanted: set[str], have: set[str]) -> None:
    missing = sorted(wanted - have)
    if missing:
        raise CheckpointError(f"{p}: no tensor named {missing[:5]} ({len(have)} tensors available)")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return dtype_from_name(dtype, "dtype")


def _finish(t: torch.Tensor, name: str, file: Path, cast: torch.dtype | None, check: bool) -> torch.Tensor:
    t = normalize_tensor(t, name, file)
    if check and not all_finite(t):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise CheckpointError(f"{file}: tensor {name!r} contains {n_nan} NaN and {n_inf} Inf values")
    if cast is not None and t.is_floating_point() and t.dtype != cast:
        t = t.to(cast)
    return t


def load_state_dict(path: str | os.PathLike, **kwargs) -> dict[str, torch.Tensor]:
    """The whole checkpoint as a dict (convenience; takes :func:`iter_tensors` keyword arguments)."""
    return dict(iter_tensors(path, **kwargs))
