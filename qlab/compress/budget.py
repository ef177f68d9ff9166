"""Byte accounting like the challenge: artifact = compressed model blob + code bytes ≤ 16 MB.

Parameter Golf counts the compressed weights plus the UTF-8 bytes of the submission's
code against a **decimal** cap of 16,000,000 bytes (PAPERS.md §3: e.g. 15,969,408 +
15,516 = 15,984,924). Some records shrink the code by shipping it lzma-compressed inside
a one-line self-extracting stub (:func:`lzma_wrap`); :func:`code_bytes` counts either form.

:func:`budget_table` breaks a quantized state down tensor by tensor: what each entry
stores raw, what it costs compressed (predicted by :mod:`qlab.compress.predict`, or
measured by compressing it alone), its share of the artifact, then summary rows for the
whole blob (whose compression is joint, so it differs from the per-tensor sum by the
container/skeleton overhead shown in its own row), the code and the artifact vs the cap.

Sizes are for qlab's own container (:func:`qlab.compress.container.encode_artifact`,
what ``qlab quantize`` writes) unless ``fmt="ptz"`` asks for the records' serialisation
(``brotli11(BSHF(torch.save(tree)))``).
"""

from __future__ import annotations

import base64
import lzma
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from qlab.compress.codecs import get_codec
from qlab.compress.container import REST_CODEC, SYMBOL_CODEC, artifact_header, encode_artifact, to_arrays
from qlab.compress.entropy import entropy_bits
from qlab.compress.predict import BROTLI_OVERHEAD, predict_data_bytes, predict_table, skeleton_bytes
from qlab.compress.ptz import ptz_bytes, ptz_tree
from qlab.errors import ConfigError, DataError
from qlab.quant.policy import Passthrough
from qlab.quant.tensor import QuantizedTensor

CAP = 16_000_000  # decimal bytes, compressed model + code
WRAPS = ("raw", "lzma")
FORMATS = ("qlab", "ptz")
_STUB = 'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{payload}")))\n'
SUMMARY_ROWS = ("[overhead]", "[model]", "[code]", "[artifact]")


# --------------------------------------------------------------------------- code bytes


def lzma_wrap(code: str) -> str:
    """A self-extracting stub running ``code``: xz (preset 9e) + base85, one ``exec`` line."""
    packed = lzma.compress(code.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)
    return _STUB.format(payload=base64.b85encode(packed).decode("ascii"))


def _code_texts(paths_or_text: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(paths_or_text, str):
        return [paths_or_text]
    items = [paths_or_text] if isinstance(paths_or_text, os.PathLike) else list(paths_or_text)
    texts = []
    for p in map(Path, items):
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"code file {p}: cannot read as UTF-8 text ({exc})") from exc
    return texts


def code_bytes(paths_or_text: str | os.PathLike | Iterable[str | os.PathLike], wrap: str = "raw") -> int:
    """UTF-8 bytes the submission's code counts for.

    A ``str`` is the code itself; a path or a list of paths names files (each counted,
    and with ``wrap="lzma"`` each wrapped, on its own). ``wrap="raw"`` counts the text as
    is; ``"lzma"`` counts the :func:`lzma_wrap` stub that replaces it.
    """
    if wrap not in WRAPS:
        raise ConfigError(f"code wrap must be one of {WRAPS}, got {wrap!r}")
    texts = _code_texts(paths_or_text)
    if wrap == "lzma":
        texts = [lzma_wrap(t) for t in texts]
    return sum(len(t.encode("utf-8")) for t in texts)


# --------------------------------------------------------------------------- whole-blob sizes


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"artifact format must be one of {FORMATS}, got {fmt!r}")


def measure_artifact_bytes(
    quantized_state: Mapping[str, Any],
    *,
    codec: str = "brotli-11",
    fmt: str = "qlab",
    policy: Any = None,
    extra: dict | None = None,
) -> int:
    """Real compressed size of the model blob (runs the codec; slow for brotli-11 on big models)."""
    _check_format(fmt)
    if fmt == "ptz":
        return len(ptz_bytes(ptz_tree(quantized_state), codec=codec))
    return len(encode_artifact(dict(quantized_state), policy=policy, codec=codec, extra=extra))


def _qlab_header_bytes(quantized_state: Mapping[str, Any], policy: Any, extra: dict | None) -> int:
    """Prefix + (compressed) header of the qlab container, from an encode with the raw codec.

    The real header names another codec and payload length; after the header's own
    brotli compression that changes its size by a few bytes, far inside the prediction's
    error, so no correction is attempted.
    """
    raw = encode_artifact(dict(quantized_state), policy=policy, codec="raw", shuffle=False, extra=extra)
    return len(raw) - _raw_payload_len(quantized_state)


def _raw_payload_len(quantized_state: Mapping[str, Any]) -> int:
    offset = 0
    for value in quantized_state.values():
        for a in to_arrays(value)[1].values():
            offset += (-offset) % 8 + _nbytes(a)
    return offset


def _nbytes(a: Any) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    return int(np.asarray(a).nbytes)


def predict_artifact_bytes(
    quantized_state: Mapping[str, Any],
    *,
    fmt: str = "qlab",
    policy: Any = None,
    extra: dict | None = None,
) -> int:
    """Predicted brotli-11 size of the model blob without running brotli-11 on the data.

    Data bytes come from :func:`qlab.compress.predict.predict_table`; the fixed part is
    the qlab header (``fmt="qlab"``) or the compressed torch.save skeleton (``"ptz"``).
    """
    _check_format(fmt)
    data = predict_data_bytes(dict(quantized_state))
    if fmt == "ptz":
        return int(round(skeleton_bytes(ptz_tree(quantized_state)) + data))
    return int(round(_qlab_header_bytes(quantized_state, policy, extra) + data))


# --------------------------------------------------------------------------- per-tensor table


def describe_entry(value: Any) -> dict[str, Any]:
    """kind, bits and clip k of one quantized-state entry (NaN/None where not applicable)."""

    if isinstance(value, QuantizedTensor):
        params = value.meta.get("clip_params", {}) or {}
        k = params.get("k")
        return {"kind": str(value.meta.get("method", value.scheme)), "bits": value.bits, "k": k}
    if isinstance(value, Passthrough):
        bits = 8 if value.kind.startswith("int8") else value.data.element_size() * 8
        return {"kind": f"passthrough:{value.kind}", "bits": bits, "k": None}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(value)
        return {"kind": "tensor", "bits": t.element_size() * 8, "k": None}
    raise ConfigError(f"budget: cannot account for an entry of type {type(value).__name__}")


def _numel(value: Any) -> int:
    return int(np.prod(tuple(value.shape), dtype=np.int64))


def _entry_payload(value: Any, skip: tuple[str, ...] = ()) -> bytes:
    """The entry's arrays (but ``skip``) concatenated as the container stores them (8-byte aligned)."""
    chunks, offset = [], 0
    for role, a in to_arrays(value)[1].items():
        if role in skip:
            continue
        t = a.detach().cpu().contiguous() if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        pad = (-offset) % 8
        chunks.append(b"\0" * pad + raw)
        offset += pad + len(raw)
    return b"".join(chunks)


def _order0_bytes(value: Any) -> float:
    """n·H0/8 of a quantized entry's codes: the bound a per-tensor order-0 coder reaches."""

    if not isinstance(value, QuantizedTensor):
        return float("nan")
    return entropy_bits(value.codes.detach().cpu().numpy()) / 8


def _symbol_coded_per_entry(quantized_state: Mapping[str, Any], blob: bytes) -> dict[str, float]:
    """Per entry of an ``ans`` artifact: its codes' symbol stream (as stored) + its other
    arrays compressed alone with the container's pooled codec."""
    streams = dict(artifact_header(blob)["symbols"]["streams"])
    rest = get_codec(REST_CODEC, shuffle=True)
    out = {}
    for name, value in quantized_state.items():
        others = _entry_payload(value, skip=("codes",) if name in streams else ())
        out[name] = float(streams.get(name, 0) + (len(rest.compress(others)) if others else 0))
    return out


def _predicted_per_entry(quantized_state: Mapping[str, Any]) -> dict[str, float]:
    table = predict_table(dict(quantized_state))
    owner = table["name"].map(lambda leaf: _owner(leaf, quantized_state))
    return (table["predicted_bytes"] * (1.0 + BROTLI_OVERHEAD)).groupby(owner).sum().to_dict()


def _owner(leaf: str, names: Mapping[str, Any]) -> str:
    """The state entry a predict_table leaf (``name`` or ``name.q``/``name.scale``) belongs to."""
    if leaf in names:
        return leaf
    head = leaf.rsplit(".", 1)[0]
    return head if head in names else leaf


def budget_table(
    quantized_state: Mapping[str, Any],
    *,
    codec: str = "brotli-11",
    predicted: bool = True,
    code: int = 0,
    cap: int = CAP,
    fmt: str = "qlab",
    policy: Any = None,
    extra: dict | None = None,
) -> pd.DataFrame:
    """Per-tensor byte breakdown plus ``[overhead]``, ``[model]``, ``[code]``, ``[artifact]`` rows.

    Columns: name, kind, bits, k, numel, raw_bytes (stored arrays, uncompressed),
    compressed_bytes (predicted brotli-11 with ``predicted=True``, else each entry
    compressed alone with ``codec`` + byte shuffle), share (of the artifact), and
    headroom_bytes (cap − artifact, on the ``[artifact]`` row). ``code`` is the code
    byte count (see :func:`code_bytes`). ``df.attrs`` holds cap, model_bytes,
    artifact_bytes, headroom_bytes, fits and whether the sizes are predicted.
    """
    if not isinstance(cap, int) or cap <= 0:
        raise ConfigError(f"budget cap must be a positive integer number of bytes, got {cap!r}")
    if predicted:
        per = _predicted_per_entry(quantized_state)
        model = predict_artifact_bytes(quantized_state, fmt=fmt, policy=policy, extra=extra)
    elif codec == SYMBOL_CODEC and fmt == "qlab":
        blob = encode_artifact(dict(quantized_state), policy=policy, codec=codec, extra=extra)
        per, model = _symbol_coded_per_entry(quantized_state, blob), len(blob)
    else:
        c = get_codec(codec, shuffle=True)
        per = {n: float(len(c.compress(_entry_payload(v)))) for n, v in quantized_state.items()}
        model = measure_artifact_bytes(quantized_state, codec=codec, fmt=fmt, policy=policy, extra=extra)
    rows = []
    for name, value in quantized_state.items():
        rows.append(
            {
                "name": name,
                **describe_entry(value),
                "numel": _numel(value),
                "raw_bytes": len(_entry_payload(value)),
                "compressed_bytes": float(per.get(name, 0.0)),
                "order0_bytes": _order0_bytes(value),
            }
        )
    tensors = pd.DataFrame(rows)
    return _with_summary(tensors, model, int(code), cap, predicted)


def _with_summary(tensors: pd.DataFrame, model: int, code: int, cap: int, predicted: bool) -> pd.DataFrame:
    artifact = model + code
    per_sum = float(tensors["compressed_bytes"].sum()) if len(tensors) else 0.0
    summary = pd.DataFrame(
        [
            {"name": "[overhead]", "kind": "container", "compressed_bytes": model - per_sum},
            {
                "name": "[model]",
                "kind": "total",
                "numel": int(tensors["numel"].sum()) if len(tensors) else 0,
                "raw_bytes": int(tensors["raw_bytes"].sum()) if len(tensors) else 0,
                "compressed_bytes": float(model),
            },
            {"name": "[code]", "kind": "code", "raw_bytes": code, "compressed_bytes": float(code)},
            {
                "name": "[artifact]",
                "kind": "total",
                "compressed_bytes": float(artifact),
                "headroom_bytes": cap - artifact,
            },
        ]
    )
    df = pd.concat([tensors, summary], ignore_index=True)
    df["share"] = df["compressed_bytes"] / artifact if artifact else np.nan
    df.attrs.update(
        cap=cap,
        model_bytes=int(model),
        code_bytes=code,
        artifact_bytes=int(artifact),
        headroom_bytes=int(cap - artifact),
        fits=bool(artifact <= cap),
        predicted=bool(predicted),
    )
    cols = ["name", "kind", "bits", "k", "numel", "raw_bytes", "compressed_bytes", "order0_bytes", "share",
            "headroom_bytes"]  # fmt: skip
    return df.reindex(columns=cols)
