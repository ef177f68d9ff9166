"""Codec table on SDClip codes of the record model's shapes, and the brotli-11 predictor.

Until a trained checkpoint is wired in, the codes come from Gaussian weights quantised
with SDClip like the record (matrices int6 k = 12.85, embedding int8 k = 20). To stay
within ~2 min on 2 cores (brotli-11 runs at ~0.5–1 MB/s) it uses one transformer block
(all six matrices) plus 1/8 of the 8192×512 embedding rows: 2.1M codes.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.record import Record
from qlab.compress.ans import ans_decode, ans_encode
from qlab.compress.codecs import get_codec
from qlab.compress.entropy import entropy_bits
from qlab.compress.predict import measure_compressed_bytes, predict_compressed_bytes, serialize_record
from qlab.quant.rtn import quantize_rtn

D = 512
BLOCK = {
    "attn.c_q": (D, D),
    "attn.c_k": (D // 2, D),
    "attn.c_v": (D // 2, D),
    "attn.proj": (D, D),
    "mlp.fc": (4 * D, D),
    "mlp.proj": (D, 4 * D),
}


def record_like_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (r, c) in BLOCK.items():
        w = 0.02 * torch.randn(r, c, generator=g)
        state[f"blocks.0.{name}.weight"] = quantize_rtn(w, 6, clip="sdclip", clip_params={"k": 12.85})
    emb = 0.005 * torch.randn(8192 // 8, D, generator=g)
    state["tok_emb.weight"] = quantize_rtn(emb, 8, clip="sdclip", clip_params={"k": 20.0})
    return state


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def _codec_records(codes: list[np.ndarray], ideal: float) -> list[Record]:
    stream = b"".join(c.tobytes() for c in codes)
    mb = len(stream) / 1e6
    records, sizes = [], {}
    for spec in ["brotli-11", "brotli-11+shuffle", "lzma-6", "lzma-9e", "zstd-19"]:
        codec = get_codec(spec)
        blob, t_enc = _timed(codec.compress, stream)
        _, t_dec = _timed(codec.decompress, blob)
        records.append(_rec(spec, len(blob), ideal, mb, t_enc, t_dec))
        sizes[spec] = len(blob)
    blobs, t_enc = _timed(lambda: [ans_encode(c) for c in codes])
    _, t_dec = _timed(lambda: [ans_decode(b) for b in blobs])
    ans_bytes = sum(len(b) for b in blobs)
    rec = _rec("ans (per-tensor order-0)", ans_bytes, ideal, mb, t_enc, t_dec)
    rec.met = ans_bytes <= 1.003 * ideal and ans_bytes < sizes["brotli-11"]
    rec.target = "<= 1.003 and < brotli-11"
    return [*records, rec]


def _rec(spec: str, nbytes: int, ideal: float, mb: float, t_enc: float, t_dec: float) -> Record:
    return Record(
        name=f"codec {spec}",
        metric="bytes / order-0 entropy",
        value=nbytes / ideal,
        unit="x",
        baseline="per-tensor n*H0/8",
        notes=f"{nbytes} B; enc {mb / t_enc:.2f} MB/s, dec {mb / t_dec:.1f} MB/s",
    )


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


def run() -> list[Record]:
    state = record_like_state()
    codes = [q.codes.numpy() for q in state.values()]
    ideal = sum(entropy_bits(c) for c in codes) / 8
    return _codec_records(codes, ideal) + _predictor_records(state)


if __name__ == "__main__":
    from benchmarks.record import markdown_table

    print(markdown_table(run()))
