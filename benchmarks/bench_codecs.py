"""Artifact codecs side by side: bytes as a share of the per-tensor order-0 bound.

Three sources of codes, one table:

* **demo checkpoint**: ``runs/demo/model.qlab``, the GPTQ artifact ``make demo`` writes
  (trained tiny model, record_small policy: int6 matrices, int8 embedding). The rows
  ``artifact codes vs order-0`` and ``artifact vs brotli-11+shuffle`` are measured here.
  Skipped, with a note, when the demo has not been run (``make bench`` runs it first).
* **third-party checkpoints**: small GPTs trained by others (``benchmarks/third_party.py``,
  fetched by ``make third-party``; skipped with a note where absent), RTN-quantized
  record_small-style.
* **record-shaped synthetic**: Gaussian weights quantised with SDClip like the record
  (matrices int6 k = 12.85, embedding int8 k = 20), one transformer block plus 1/8 of the
  8192×512 embedding (2.1M codes), small enough for brotli-11 and lzma-9e in ~1 min.
  No structure beyond order-0: it shows what each context model costs when it cannot win.
* **record-shaped 16 MB artifact**: all 11 blocks and the whole embedding (36M codes),
  for the decode (≤ 2 s) and encode (≤ 10 s) times of the ``ans`` container on one core.

Symbol-coder variants (``qlab.compress.symbols``): adaptive order-0 alone, then each
context model alone on top of it (column-spread groups, row references, warm start
from the previous layer's tensor of the same role), then all together as the container
writes them. lrzip/zpaq rows appear when those programs are installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import third_party
from benchmarks.record import Record
from qlab.compress.ans import ans_decode, ans_encode
from qlab.compress.codecs import get_codec
from qlab.compress.container import decode_artifact, encode_artifact, read_artifact, role_key
from qlab.compress.entropy import entropy_bits
from qlab.compress.predict import measure_compressed_bytes, predict_compressed_bytes, serialize_record
from qlab.compress.symbols import decode_symbols, encode_symbols
from qlab.loaders import load_state_dict
from qlab.quant.policy import get_policy, quantize_state_dict
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import QuantizedTensor

DEMO_ARTIFACT = Path(os.environ.get("QLAB_BENCH_DEMO", "runs/demo/model.qlab"))

D = 512
BLOCK = {
    "attn.c_q": (D, D),
    "attn.c_k": (D // 2, D),
    "attn.c_v": (D // 2, D),
    "attn.proj": (D, D),
    "mlp.fc": (4 * D, D),
    "mlp.proj": (D, 4 * D),
}


def record_like_state(seed: int = 0, layers: int = 1, emb_rows: int = 8192 // 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for name, (r, c) in BLOCK.items():
            w = 0.02 * torch.randn(r, c, generator=g)
            state[f"blocks.{i}.{name}.weight"] = quantize_rtn(w, 6, clip="sdclip", clip_params={"k": 12.85})
    emb = 0.005 * torch.randn(emb_rows, D, generator=g)
    state["tok_emb.weight"] = quantize_rtn(emb, 8, clip="sdclip", clip_params={"k": 20.0})
    return state


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def _codes(state: dict) -> dict[str, np.ndarray]:
    return {n: v.codes.numpy() for n, v in state.items() if isinstance(v, QuantizedTensor)}


def _byte_codec_records(label: str, codes: dict[str, np.ndarray], ideal: float) -> list[Record]:
    stream = b"".join(c.tobytes() for c in codes.values())
    mb = len(stream) / 1e6
    records = []
    for spec in ["brotli-11+shuffle", "lzma-9e", "zstd-19"]:
        codec = get_codec(spec)
        blob, t_enc = _timed(codec.compress, stream)
        _, t_dec = _timed(codec.decompress, blob)
        records.append(_rec(label, spec, len(blob), ideal, mb, t_enc, t_dec))
    records += [_external(label, tool, stream, ideal) for tool in ("lrzip", "zpaq")]
    blobs, t_enc = _timed(lambda: [ans_encode(c) for c in codes.values()])
    _, t_dec = _timed(lambda: [ans_decode(b) for b in blobs])
    nbytes = sum(len(b) for b in blobs)
    records.append(_rec(label, "ans order-0 with count table", nbytes, ideal, mb, t_enc, t_dec))
    return records


def _external(label: str, tool: str, stream: bytes, ideal: float) -> Record:
    """lrzip -z (its ZPAQ back-end) or zpaq -m5, when installed: the context-mixing reference."""
    if shutil.which(tool) is None:
        return _rec(label, f"{tool} (not installed: skipped)", 0, ideal, 0.0, 0.0, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "codes.bin"
        src.write_bytes(stream)
        cmd = (
            ["lrzip", "-z", "-q", str(src)]
            if tool == "lrzip"
            else ["zpaq", "a", f"{src}.zpaq", str(src), "-m5"]
        )
        _, t_enc = _timed(subprocess.run, cmd, **{"check": True, "capture_output": True})
        out = Path(f"{src}.lrz" if tool == "lrzip" else f"{src}.zpaq")
        return _rec(
            label, f"{tool} ({' '.join(cmd[1:2])})", out.stat().st_size, ideal, len(stream) / 1e6, t_enc, 0.0
        )


VARIANTS = {  # name: (groups, references, warm start from the previous layer)
    "symbols: adaptive order-0": (1, False, False),
    "symbols: + column groups": (None, False, False),
    "symbols: + row references": (1, True, False),
    "symbols: + warm start": (1, False, True),
    "symbols: all (what --codec ans writes)": (None, True, True),
}


def _symbol_records(label: str, codes: dict[str, np.ndarray], ideal: float) -> tuple[list[Record], int]:
    mb = sum(c.nbytes for c in codes.values()) / 1e6
    records, combined = [], 0
    for variant, (groups, refs, warm) in VARIANTS.items():

        def code_all(groups=groups, refs=refs, warm=warm) -> list[tuple[bytes, np.ndarray | None]]:
            out, previous = [], {}
            for name, c in codes.items():
                context = previous.get(role_key(name)) if warm else None
                out.append((encode_symbols(c, groups=groups, references=refs, context=context), context))
                previous[role_key(name)] = c
            return out

        blobs, t_enc = _timed(code_all)
        _, t_dec = _timed(lambda blobs=blobs: [decode_symbols(b, context=ctx) for b, ctx in blobs])
        nbytes = sum(len(b) for b, _ in blobs)
        records.append(_rec(label, variant, nbytes, ideal, mb, t_enc, t_dec))
        combined = nbytes
    return records, combined


def _rec(label: str, spec: str, nbytes: int, ideal: float, mb: float, t_enc: float, t_dec: float) -> Record:
    speed = f"enc {mb / t_enc:.2f} MB/s" + (f", dec {mb / t_dec:.1f} MB/s" if t_dec else "") if t_enc else ""
    return Record(
        name=f"codec {label}: {spec}",
        metric="bytes / order-0 entropy",
        value=nbytes / ideal if nbytes else float("nan"),
        unit="x",
        baseline="per-tensor n*H0/8",
        notes=f"{nbytes} B; {speed}" if nbytes else "",
    )


def _conditional_bits(x: np.ndarray, ctx: np.ndarray) -> float:
    """Σ over contexts of n_c·H(x | c), in bits: the empirical bound, with no model cost."""
    joint = np.unique(ctx.astype(np.int64) * 4096 + x.astype(np.int64) + 2048, return_counts=True)[1]
    per_ctx = np.unique(ctx, return_counts=True)[1]
    return float((per_ctx * np.log2(per_ctx)).sum() - (joint * np.log2(joint)).sum())


def _context_bounds(label: str, codes: dict[str, np.ndarray], ideal: float) -> list[Record]:
    """What a coder conditioned on a code's neighbours could reach at best: the empirical
    conditional entropy given the left and/or upper neighbour (clipped to ±4; 'none' at
    an edge), per tensor, before paying to learn one model per context. An upper bound on
    the gain of neighbour-context models (and their mixing) over order-0."""
    sums = {"left": 0.0, "above": 0.0, "left+above": 0.0}
    for c in codes.values():
        if c.ndim != 2 or min(c.shape) < 2:
            continue
        c = c.astype(np.int64)
        left = np.pad(np.clip(c[:, :-1], -4, 4) + 5, ((0, 0), (1, 0)))  # 0 = no neighbour
        above = np.pad(np.clip(c[:-1], -4, 4) + 5, ((1, 0), (0, 0)))
        for key, ctx in (("left", left), ("above", above), ("left+above", left * 10 + above)):
            sums[key] += _conditional_bits(c.ravel(), ctx.ravel())
    return [
        Record(name=f"codec {label}: bound given the {key} neighbour", metric="bytes / order-0 entropy",
               value=bits / 8 / ideal, unit="x", baseline="per-tensor n*H0/8",
               notes="empirical conditional entropy, no model cost: a bound, not a coder")
        for key, bits in sums.items()
    ]  # fmt: skip


def _table(label: str, state: dict) -> tuple[list[Record], float, int]:
    codes = _codes(state)
    ideal = sum(entropy_bits(c) for c in codes.values()) / 8
    symbol_rows, combined = _symbol_records(label, codes, ideal)
    bounds = _context_bounds(label, codes, ideal)
    return _byte_codec_records(label, codes, ideal) + symbol_rows + bounds, ideal, combined


def _headline(label: str, state: dict, ideal: float, combined: int, prefix: str = "") -> list[Record]:
    """The rows followed across runs (on the demo's trained checkpoint without a prefix)."""
    ans = len(encode_artifact(state, codec="ans"))
    brotli = len(encode_artifact(state, codec="brotli-11"))
    return [
        Record(
            name=f"{prefix}artifact codes vs order-0",
            metric="bytes ratio",
            value=combined / ideal,
            unit="x",
            target="<= 1.003; < 1 with context models",
            baseline="per-tensor n*H0/8 of the codes",
            met=combined <= 1.003 * ideal,
            notes=f"{label}: {combined:,} B of symbol streams vs {ideal:,.0f} B order-0",
        ),
        Record(
            name=f"{prefix}artifact vs brotli-11+shuffle",
            metric="bytes ratio",
            value=ans / brotli,
            unit="x",
            target="<= 0.995",
            baseline="the same state in a brotli-11+shuffle .qlab",
            met=ans <= 0.995 * brotli,
            notes=f"{label}: whole .qlab file {ans:,} B (--codec ans) vs {brotli:,} B",
        ),
    ]


def _speed_records() -> list[Record]:
    """Encode/decode of a record-shaped ~16 MB ``ans`` artifact on one core."""
    state = record_like_state(layers=11, emb_rows=8192)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blob, t_enc = _timed(lambda: encode_artifact(state, codec="ans"))
        _, t_dec = _timed(decode_artifact, blob)
    finally:
        torch.set_num_threads(threads)
    n = sum(v.codes.numel() for v in state.values())
    note = (
        f"{len(blob) / 1e6:.2f} MB artifact, {n / 1e6:.1f}M codes (11 blocks + 8192x512 embedding), 1 thread"
    )
    return [
        Record("ans artifact decode, record-shaped", "wall time", t_dec, "s", "<= 2 s on one core",
               met=t_dec <= 2.0, notes=note),
        Record("ans artifact encode, record-shaped", "wall time", t_enc, "s", "<= 10 s on one core",
               met=t_enc <= 10.0, notes=note),
    ]  # fmt: skip


def _predictor_records(state: dict) -> list[Record]:
    raw = serialize_record(state)
    real, t_real = _timed(measure_compressed_bytes, raw)
    pred, t_pred = _timed(predict_compressed_bytes, state)
    err = pred / real - 1
    return [
        Record(
            name="predict brotli-11 size",
            metric="relative error",
            value=err,
            unit="",
            target="|err| <= 0.01",
            baseline="real brotli-11 + BSHF",
            met=abs(err) <= 0.01,
            notes=f"pred {pred} B vs real {real} B",
        ),
        Record(
            name="predict brotli-11 size",
            metric="speed-up",
            value=t_real / t_pred,
            unit="x",
            target=">= 100",
            baseline="running brotli-11",
            met=t_real / t_pred >= 100,
            notes=f"{t_real:.1f} s vs {t_pred:.3f} s on {len(raw) / 1e6:.1f} MB; grows with size",
        ),
    ]


def _demo_records() -> list[Record]:
    if not DEMO_ARTIFACT.is_file():
        note = f"skipped: {DEMO_ARTIFACT} not found (run `make demo`, or set QLAB_BENCH_DEMO)"
        names = ("artifact codes vs order-0", "artifact vs brotli-11+shuffle")
        return [Record(name, "bytes ratio", float("nan"), "x", notes=note) for name in names]
    state, _ = read_artifact(DEMO_ARTIFACT)
    rows, ideal, combined = _table("demo", state)
    return _headline("demo checkpoint (make demo)", state, ideal, combined) + rows


def _third_party_records() -> list[Record]:
    """Checkpoints trained by others (``make third-party``), quantized record_small-style
    by RTN (no calibration data of theirs: int6 SDClip matrices, int8 embeddings)."""
    found = third_party.present()
    if not found:
        note = "skipped: no third-party checkpoint in data/third_party (run `make third-party`)"
        return [
            Record("third-party: artifact codes vs order-0", "bytes ratio", float("nan"), "x", notes=note)
        ]
    rows = []
    for c in found:
        state = quantize_state_dict(load_state_dict(c.local), get_policy("record_small"))
        label = f"third-party {c.name}"
        table, ideal, combined = _table(label, state)
        rows += _headline(f"{c.repo} ({c.what})", state, ideal, combined, prefix=f"{label}: ") + table
    return rows


def run() -> list[Record]:
    synthetic = record_like_state()
    rows, _, _ = _table("record-shaped synthetic", synthetic)
    return _demo_records() + _third_party_records() + rows + _speed_records() + _predictor_records(synthetic)


if __name__ == "__main__":
    from benchmarks.record import markdown_table

    print(markdown_table(run()))
