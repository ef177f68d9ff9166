"""One visual style for every qlab figure (seaborn "whitegrid", colour-blind palette).

Plot functions build their figures inside :func:`style_context`, so a figure looks the
same whatever the caller's global matplotlib state; :func:`use_style` applies the same
settings globally (notebooks). Figures are created with :class:`matplotlib.figure.Figure`
directly — never through pyplot — so nothing is shown, nothing leaks into pyplot's
figure registry, and any backend (Agg in CI) works. Only :func:`save_figure` writes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.rcsetup import cycler

from qlab.errors import ConfigError, DataError
from qlab.io.atomic import atomic_write_bytes

__all__ = [
    "PALETTE",
    "MAX_PNG_BYTES",
    "style_rc",
    "style_context",
    "use_style",
    "palette",
    "new_figure",
    "save_figure",
    "label_axes",
    "has_unit",
    "SOURCE_LINESTYLES",
    "SOURCE_HATCHES",
    "require_columns",
    "sources",
    "annotate_bars",
]

#: seaborn's colour-blind-safe qualitative palette (Wong-like), 10 colours.
PALETTE = "colorblind"
MAX_PNG_BYTES = 300_000
#: Default size of one panel in inches (at 110 dpi: ~530 × 370 px).
PANEL_SIZE = (4.8, 3.4)
_UNIT = re.compile(r"\([^)]+\)|\[[^\]]+\]")


def style_rc() -> dict:
    """The rcParams every qlab figure uses: whitegrid axes, readable fonts at ~100 dpi."""
    rc = dict(sns.axes_style("whitegrid"))
    rc |= sns.plotting_context("notebook", font_scale=0.85)
    rc |= {
        "axes.prop_cycle": cycler(color=sns.color_palette(PALETTE)),
        "axes.titlesize": 10.5,
        "axes.titleweight": "bold",
        "axes.labelsize": 9.5,
        "xtick.labelsize": 8.5,
        "ytick.labelsize": 8.5,
        "legend.fontsize": 8,
        "legend.title_fontsize": 8.5,
        "figure.titlesize": 12,
        "figure.titleweight": "bold",
        "figure.dpi": 100,
        "figure.constrained_layout.use": True,
        "axes.edgecolor": "0.3",
        "grid.color": "0.88",
        "image.cmap": "viridis",
    }
    return rc


@contextmanager
def style_context() -> Iterator[None]:
    """Temporarily apply :func:`style_rc` (restored on exit)."""
    with mpl.rc_context(style_rc()):
        yield


def use_style() -> None:
    """Apply the qlab style globally (for notebooks and scripts that use pyplot)."""
    mpl.rcParams.update(style_rc())


def palette(n: int) -> list[tuple[float, float, float]]:
    """``n`` colour-blind-safe colours (cycles the 10-colour palette beyond 10)."""
    base = sns.color_palette(PALETTE)
    return [base[i % len(base)] for i in range(max(n, 0))]


def new_figure(
    nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None, **subplot_kw
) -> tuple[Figure, np.ndarray]:
    """A styled Figure and a 2-D array of Axes (shape nrows × ncols).

    ``size`` is the whole figure in inches; by default each panel gets
    :data:`PANEL_SIZE`. Call inside :func:`style_context` (plot functions do) or after
    :func:`use_style` so fonts and grid follow the qlab style.
    """
    if nrows < 1 or ncols < 1:
        raise ConfigError(f"new_figure needs nrows, ncols ≥ 1, got {nrows} × {ncols}")
    size = size or (PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def has_unit(label: str) -> bool:
    """True when the label names a unit in parentheses or brackets, e.g. "Δ (mBPB)"."""
    return bool(_UNIT.search(label or ""))


def label_axes(
    ax: Axes, xlabel: str, ylabel: str, title: str | None = None, *, unitless: str | tuple[str, ...] = ()
) -> Axes:
    """Set labels, insisting that each quantitative axis states its unit.

    ``unitless`` names the axes ("x", "y") that are categorical (variant names, stages)
    and so carry no unit; every other label must contain "(unit)" or "[unit]" — use
    "(count)" or "(dimensionless)" for pure numbers.
    """
    for axis, label in (("x", xlabel), ("y", ylabel)):
        if not label or not label.strip():
            raise ConfigError(f"{axis} label is empty; every axis with data needs a label")
        if axis not in unitless and not has_unit(label):
            raise ConfigError(f"{axis} label {label!r} has no unit; write e.g. '{label} (bpb)'")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def _render(fig: Figure, dpi: float) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def save_figure(
    fig: Figure, path: str | Path, *, dpi: float = 110, max_bytes: int = MAX_PNG_BYTES, min_dpi: float = 55
) -> Path:
    """Write ``fig`` as a PNG atomically; lowers the dpi until the file is < ``max_bytes``.

    Raises :class:`DataError` if even ``min_dpi`` cannot get under the limit, and
    :class:`ConfigError` for a non-``.png`` path.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"save_figure writes PNG; {path} should end in .png")
    d = float(dpi)
    data = _render(fig, d)
    while len(data) >= max_bytes and d > min_dpi:
        d = max(min_dpi, d * 0.8)
        data = _render(fig, d)
    if len(data) >= max_bytes:
        raise DataError(f"figure {path.name} is {len(data)} bytes even at {d:.0f} dpi (limit {max_bytes})")
    return atomic_write_bytes(path, data)


# ---------------------------------------------------------------- helpers for plot functions
#: Line styles / hatches that tell sources apart ("paper:prN" vs "qlab") in one panel.
SOURCE_LINESTYLES = ("-", "--", ":", "-.")
SOURCE_HATCHES = ("", "//", "..", "xx")


def require_columns(df: object, columns: list[str] | tuple[str, ...], what: str) -> None:
    """Raise :class:`DataError` unless ``df`` is a non-empty DataFrame with ``columns``."""
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: DataFrame lacks column(s) {missing}; has {list(df.columns)}")
    if df.empty:
        raise DataError(f"{what}: DataFrame has no rows")


def source_column(df: pd.DataFrame) -> pd.Series:
    """Each row's ``source`` as text ("data" for every row when the column is absent)."""
    return df["source"].astype(str) if "source" in df.columns else pd.Series("data", index=df.index)


def sources(df: pd.DataFrame) -> list[str]:
    """Distinct values of the ``source`` column in first-seen order (["data"] if absent)."""
    if "source" not in df.columns:
        return ["data"]
    return list(dict.fromkeys(df["source"].astype(str)))


def annotate_bars(
    ax: Axes, bars: BarContainer, fmt: str = "{:.2f}", fontsize: float = 7.5, err: object = None
) -> None:
    """Write each bar's value just outside its end (above positive, below negative bars),
    beyond its error bar when ``err`` (one half-width per bar) is given."""
    errs = np.zeros(len(bars)) if err is None else np.nan_to_num(np.asarray(err, dtype=float))
    for bar, e in zip(bars, errs):
        h = bar.get_height()
        if not np.isfinite(h):
            continue
        x = bar.get_x() + bar.get_width() / 2
        ax.annotate(
            fmt.format(h),
            (x, h + np.copysign(e, h)),
            xytext=(0, 2 if h >= 0 else -2),
            textcoords="offset points",
            ha="center",
            va="bottom" if h >= 0 else "top",
            fontsize=fontsize,
        )
