"""``generate_figures``: build every registered figure (or some) and write them as PNGs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from qlab.figures.registry import FIGURES, get_figure
from qlab.figures.scale import Scale
from qlab.figures.workspace import Workspace
from qlab.plots.style import save_figure

__all__ = ["generate_figures"]


def generate_figures(
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    scale: str | Scale = "smoke",
    only: Iterable[str] | None = None,
    progress: bool | None = None,
    data: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Write ``out_dir/<id>.png`` for every figure (or the ids in ``only``).

    ``checkpoint`` is a qlab run directory, or any weights file qlab reads (safetensors, a
    Hugging Face directory, a state dict, an artifact): then only the figures marked
    ``weights_only`` (and the papers' own) are drawn. Without ``checkpoint`` the ``tiny``
    preset is trained on the embedded corpus at the scale's size (cached under
    ``work_dir``, default ``data/cache/figures``); measured tables are cached there too, so
    a second call only redraws. Figures of the papers' published numbers need no
    checkpoint and are always included. ``data`` (a dataset directory or ``"embedded"``)
    overrides the checkpoint's own dataset. ``progress=None`` draws bars in a notebook or
    terminal only. Returns one row per figure written: id, path, bytes, seconds (build +
    save, incl. any measurement it triggered first).
    """
    ws = Workspace(checkpoint, scale, data=data, work_dir=work_dir, progress=progress)
    if only is not None:
        ids = [get_figure(i).id for i in only]
    elif ws.weights_only:  # a weights file: the figures its weights alone can give
        ids = [f.id for f in FIGURES.values() if f.weights_only or not f.needs_model]
    else:
        ids = list(FIGURES)
    out = Path(out_dir)
    rows = []
    for fid in tqdm(ids, desc="figures", disable=not ws.progress):
        spec = FIGURES[fid]
        t0 = time.perf_counter()
        fig = spec.build(ws)
        path = save_figure(fig, out / f"{fid}.png")
        rows.append(
            {"id": fid, "path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}
        )
    return pd.DataFrame(rows, columns=["id", "path", "bytes", "seconds"])
