"""Spectral fingerprint of the record model's matrix shapes (random weights, CPU).

Measures (1) the wall time of :func:`qlab.analysis.spectra.spectral_summary` on all 67
record matrices (SVD + stable/effective rank + flatness + WeightWatcher α), (2) the
speed-up of shape-batched ``torch.linalg.svdvals`` over one call per matrix, and
(3) agreement of qlab's α with ``weightwatcher`` itself, if it can be imported. It is
not a qlab dependency: install it outside the project, e.g.
``pip install --target /tmp/ww weightwatcher`` (plus its imports), and point
``QLAB_WEIGHTWATCHER_PATH`` at that folder (default ``/tmp/ww``). Without it the α record
says it was skipped. ``QLAB_BENCH_THREADS`` sets torch's thread count (use 1, and
``OMP_NUM_THREADS=1``, on a busy machine: multi-threaded LAPACK stalls under contention).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from benchmarks.record import Record
from qlab.analysis import spectra
from qlab.config import get_preset

WW_PATH = os.environ.get("QLAB_WEIGHTWATCHER_PATH", "/tmp/ww")


def record_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the record stack's matrix shapes; half the blocks heavy-tailed
    (Student-t, 3 d.o.f.) so α has a real tail to fit."""
    c = get_preset("record")
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "attn.c_q.weight": (c.model_dim, c.model_dim),
        "attn.c_k.weight": (c.kv_dim, c.model_dim),
        "attn.c_v.weight": (c.kv_dim, c.model_dim),
        "attn.proj.weight": (c.model_dim, c.model_dim),
        "mlp.fc.weight": (c.mlp_hidden, c.model_dim),
        "mlp.proj.weight": (c.model_dim, c.mlp_hidden),
    }
    sd = {"tok_emb.weight": torch.randn(c.vocab_size, c.model_dim, generator=g) * 0.005}
    for i in range(c.num_layers):
        for suffix, (rows, cols) in shapes.items():
            w = torch.randn(rows, cols, generator=g)
            if i % 2:  # Student-t(3) = N / √(χ²₃ / 3)
                w = w / (torch.randn(3, rows, cols, generator=g).square().sum(0) / 3).sqrt()
            sd[f"blocks.{i}.{suffix}"] = w / cols**0.5
    return sd


def _best_time(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _weightwatcher_alphas(sd: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """α per matrix from weightwatcher's own analyze(), or None if it cannot be imported."""
    if os.path.isdir(WW_PATH) and WW_PATH not in sys.path:
        sys.path.append(WW_PATH)
    try:
        import weightwatcher as ww
    except Exception:  # any import failure means "not available"
        return None
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    names = list(sd)
    model = nn.Sequential()
    for k, name in enumerate(names):
        rows, cols = sd[name].shape
        lin = nn.Linear(cols, rows, bias=False)
        lin.weight.data.copy_(sd[name])
        model.add_module(f"m{k}", lin)
    df = ww.WeightWatcher(model=model).analyze(plot=False)
    return {names[int(row.name[1:])]: float(row.alpha) for row in df.itertuples() if row.name.startswith("m")}


def run() -> list[Record]:
    sd = record_state_dict()
    threads = os.environ.get("QLAB_BENCH_THREADS")
    if threads:  # on a contended machine, 1 thread avoids OpenMP oversubscription stalls
        torch.set_num_threads(int(threads))
    n = len(sd)
    t_full = _best_time(lambda: spectra.spectral_summary(sd), repeats=1)
    t_batched = _best_time(lambda: spectra.singular_values(sd, batched=True))
    t_single = _best_time(lambda: spectra.singular_values(sd, batched=False))
    records = [
        Record(
            name="spectra: full fingerprint, record shapes",
            metric="wall time",
            value=t_full,
            unit="s",
            target="< 60 s on 2 CPU cores",
            met=t_full < 60,
            notes=f"{n} matrices, SVD (float64) + ranks + flatness + WW α; {torch.get_num_threads()} threads",
        ),
        Record(
            name="spectra: batched svdvals",
            metric="speed-up vs per-matrix",
            value=t_single / t_batched,
            unit="x",
            target=">= 1",
            baseline="one torch.linalg.svdvals call per matrix",
            met=t_single / t_batched >= 1.0,
            notes=f"batched {t_batched:.2f} s vs per-matrix {t_single:.2f} s",
        ),
    ]
    ww_alpha = _weightwatcher_alphas(sd)
    if ww_alpha is None:
        records.append(
            Record(
                name="spectra: α vs weightwatcher",
                metric="mean |Δα|",
                value=float("nan"),
                unit="",
                target="< 1e-6",
                notes=f"skipped: weightwatcher not importable (looked in {WW_PATH})",
            )
        )
        return records
    ours = spectra.spectral_summary(sd).set_index("name")["alpha"]
    diffs = np.array([abs(ours[k] - a) for k, a in ww_alpha.items()])
    mean_alpha = float(np.mean(list(ww_alpha.values())))
    records.append(
        Record(
            name="spectra: α vs weightwatcher",
            metric="mean |Δα|",
            value=float(diffs.mean()),
            unit="",
            target="< 1e-6",
            baseline="weightwatcher.analyze() on the same matrices",
            met=bool(diffs.mean() < 1e-6),
            notes=f"{len(diffs)} matrices, max |Δα| {diffs.max():.3g}, mean α {mean_alpha:.3f}",
        )
    )
    return records
