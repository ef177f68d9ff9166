"""qlab's GPTQ against the record's own procedure, on all of the record's matrix shapes.

Baseline: ``benchmarks/record_gptq.py``, the record's ``gptq_mixed_quantize`` written
plainly: one matrix at a time, a Hessian per linear layer (``c_q``, ``c_k`` and ``c_v``
get three equal copies, as the record's hooks collect them), three factorisations per
matrix and its column loop. qlab (``gptq_quantize_many``) gets the Hessians as
``collect_hessians`` returns them (one tensor per distinct input), factorises each once,
and sweeps same-shape matrices of all layers as one batch:

* ``arithmetic="record"`` (the default): the record's factorisations and update order,
  element for element, so the codes are bit-identical to the baseline's;
* ``arithmetic="fast"``: one Cholesky + LAPACK ``trtri`` for Hinv and the two-level lazy
  updates; the same GPTQ with other float rounding (a few ties round the other way).

Matrices: per layer c_q 512×512, c_k/c_v 256×512, attn.proj 512×512, mlp.fc 2048×512,
mlp.proj 512×2048, 11 layers, plus the 8192×512 embedding; weights ~ N(0, 0.02), Hessians
XᵀX/n of random X. Timed at one thread and at all cores (``torch.set_num_threads``; the
fast route's LAPACK calls follow ``OMP_NUM_THREADS``, which ``make bench`` sets to 1).
"""

from __future__ import annotations

import os
import time

import torch

from benchmarks.record import Record
from benchmarks.record_gptq import record_gptq
from qlab.quant.gptq import gptq_quantize_many

LAYER_SHAPES = {
    "attn.c_q": (512, 512),
    "attn.c_k": (256, 512),
    "attn.c_v": (256, 512),
    "attn.proj": (512, 512),
    "mlp.fc": (2048, 512),
    "mlp.proj": (512, 2048),
}
SHARED_INPUT = ("attn.c_k", "attn.c_v")  # read the same input as attn.c_q
RECORD_K = {"k": 12.85, "correction": 1}  # the record's SDClip: Bessel row std


def make_problem(n_layers: int, n_x: int = 256, seed: int = 0, embedding: bool = True):
    """Weights and Hessians keyed by record-style names; c_k/c_v are given c_q's Hessian
    *tensor*, as ``collect_hessians`` returns it."""
    g = torch.Generator().manual_seed(seed)
    ws, hs = {}, {}
    for i in range(n_layers):
        for key, (rows, cols) in LAYER_SHAPES.items():
            name = f"blocks.{i}.{key}.weight"
            ws[name] = torch.randn(rows, cols, generator=g) * 0.02
            if key in SHARED_INPUT:
                hs[name] = hs[f"blocks.{i}.attn.c_q.weight"]
            else:
                x = torch.randn(n_x, cols, generator=g)
                hs[name] = x.T @ x / n_x
    if embedding:
        ws["tok_emb.weight"] = torch.randn(8192, 512, generator=g) * 0.02
        x = torch.randn(n_x, 512, generator=g)
        hs["tok_emb.weight"] = x.T @ x / n_x
    return ws, hs


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _at(threads: int, ws: dict, hs: dict) -> list[Record]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_layer = {n: h.clone() for n, h in hs.items()}  # the record's three equal copies
        ref, t_ref = _timed(lambda: {n: record_gptq(ws[n], per_layer[n]) for n in ws})
        rows = []
        for arithmetic in ("record", "fast"):
            parts: dict = {}
            ours, t_ours = _timed(
                lambda a=arithmetic, p=parts: gptq_quantize_many(
                    ws, hs, clip_params=RECORD_K, arithmetic=a, timings=p
                )
            )
            rows.append(_row(threads, arithmetic, ws, ref, ours, t_ref, t_ours, parts))
        return rows
    finally:
        torch.set_num_threads(old)


def _row(threads, arithmetic, ws, ref, ours, t_ref, t_ours, parts) -> Record:
    identical = sum(torch.equal(ours[n].codes, ref[n][0]) and torch.equal(ours[n].scale[:, 0], ref[n][1])
                    for n in ws)  # fmt: skip
    worst = max(float((ours[n].codes != ref[n][0]).float().mean()) for n in ws)
    ratio = t_ref / t_ours
    exact = arithmetic == "record"
    name = "gptq vs record procedure" + ("" if exact else " (fast arithmetic)")
    return Record(
        name=f"{name}, {threads} thread{'s' if threads > 1 else ''}",
        metric="speed-up",
        value=ratio,
        unit="x",
        target=">= 3 at one thread, codes identical" if exact else ">= 3 at one thread",
        baseline="benchmarks/record_gptq.py (per-layer Hessians, 3 factorisations, column loop)",
        met=bool(ratio >= 3 and (identical == len(ws) or not exact)) if threads == 1 else None,
        notes=(
            f"{len(ws)} matrices (11 layers + embedding), int6 SDClip k=12.85 Bessel; "
            f"record {t_ref:.1f} s vs "
            f"qlab {t_ours:.1f} s (factorise+prepare {parts.get('prepare_s', 0):.1f}, sweep "
            f"{parts.get('sweep_s', 0):.1f}); codes identical on {identical}/{len(ws)} matrices, worst "
            f"mismatch {worst:.1e}"
        ),
    )


def run(n_layers: int = 11) -> list[Record]:
    ws, hs = make_problem(n_layers)
    records = _at(1, ws, hs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores > 1:
        records += _at(cores, ws, hs)
    return records


if __name__ == "__main__":
    from benchmarks.record import markdown_table

    print(markdown_table(run()))
