"""Paper-figure plot functions: Figures with labelled axes, small valid PNGs, qlab rows."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from pathlib import Path  # noqa: E402

import matplotlib as mpl  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from qlab.analysis import papers as P  # noqa: E402
from qlab.errors import ConfigError, DataError  # noqa: E402
from qlab.plots import pr1394, pr1818, pr2011  # noqa: E402
from qlab.plots.paper_figures import PAPER_FIGURES, paper_figure  # noqa: E402
from qlab.plots.style import label_axes, new_figure, save_figure, style_context, use_style  # noqa: E402


def _data_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.has_data() and ax.get_label() != "<colorbar>"]


def _assert_labelled(fig: Figure) -> None:
    axes = _data_axes(fig)
    assert axes, "figure has no axes with data"
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), f"unlabelled axes {ax.get_title()!r}"


@pytest.fixture(scope="module")
def figures() -> dict[str, Figure]:
    return {name: paper_figure(name) for name in PAPER_FIGURES}


def test_every_paper_figure_is_a_labelled_figure(figures):
    assert len(figures) == 13
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        _assert_labelled(fig)
        assert any(ax.get_title() for ax in fig.axes) or fig._suptitle is not None, name


def test_every_paper_figure_saves_a_small_png(figures, tmp_path: Path):
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / f"{name}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000, (name, len(data))
        with Image.open(path) as im:
            im.verify()
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_figure_lowers_dpi_or_refuses(tmp_path: Path):
    with style_context():
        fig, axes = new_figure()
    axes[0, 0].plot([0, 1], [0, 1])
    label_axes(axes[0, 0], "x (s)", "y (bpb)")
    big = save_figure(fig, tmp_path / "a.png", dpi=110).stat().st_size
    small = save_figure(fig, tmp_path / "b.png", dpi=110, max_bytes=big - 1).stat().st_size
    assert small < big
    with pytest.raises(DataError, match="even at"):
        save_figure(fig, tmp_path / "c.png", max_bytes=100)
    with pytest.raises(ConfigError, match=r"\.png"):
        save_figure(fig, tmp_path / "d.jpg")


def test_label_axes_insists_on_units():
    with style_context():
        fig, axes = new_figure(1, 2)
    ax = axes[0, 0]
    with pytest.raises(ConfigError, match="no unit"):
        label_axes(ax, "step", "val_bpb")
    with pytest.raises(ConfigError, match="empty"):
        label_axes(ax, "", "val_bpb (bpb)")
    label_axes(ax, "variant", "val_bpb (bpb)", "t", unitless="x")
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("variant", "val_bpb (bpb)", "t")
    assert axes.shape == (1, 2)


def test_style_context_restores_and_use_style_applies():
    before = mpl.rcParams["axes.titlesize"]
    with style_context():
        assert mpl.rcParams["axes.titleweight"] == "bold"
    assert mpl.rcParams["axes.titlesize"] == before
    saved = mpl.rcParams.copy()
    try:
        use_style()
        assert mpl.rcParams["figure.constrained_layout.use"] is True
    finally:
        mpl.rcParams.update(saved)


def _legend_texts(fig: Figure) -> str:
    return " ".join(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())


def _as_qlab(df: pd.DataFrame, **shift) -> pd.DataFrame:
    out = df.copy()
    out["source"] = "qlab"
    for col, delta in shift.items():
        out[col] = out[col] + delta
    return pd.concat([df, out], ignore_index=True)


def test_qlab_rows_drawn_beside_the_papers():
    deltas = P.reg_deltas()
    fig = pr2011.plot_cross_base_signs(_as_qlab(deltas[deltas["base"] == "A"], delta_mbpb=0.3))
    _assert_labelled(fig)
    assert "[qlab]" in _legend_texts(fig)
    fig = pr2011.plot_depth_trajectory(
        _as_qlab(P.depth_trajectory().query("variant == 'no-reg'"), mean_norm=1.0)
    )
    assert "[qlab]" in _legend_texts(fig)
    fig = pr2011.plot_cka_heatmap(_as_qlab(P.cka_pairwise()))
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 2
    fig = pr2011.plot_reg_quant_heatmaps(_as_qlab(P.reg_quant_matrix().query("variant == 'no-reg'")))
    assert any("[qlab]" in t.get_text() for ax in fig.axes for t in ax.get_yticklabels())
    _assert_labelled(pr2011.plot_canonical_metrics(_as_qlab(P.canonical_metrics())))
    _assert_labelled(
        pr2011.plot_pipeline_waterfall(_as_qlab(P.eval_pipeline_breakdown().query("base == 'B'")))
    )
    _assert_labelled(pr1818.plot_damage_gap(_as_qlab(P.pr1818_seeds(), bpb=-0.5), baseline_bpb=1.2244))
    _assert_labelled(pr1394.plot_seed_stages(_as_qlab(P.pr1394_seeds(), sliding_bpb=0.001)))
    _assert_labelled(pr1394.plot_train_curves(_as_qlab(P.pr1394_train_curve()), x="elapsed_s"))


def test_square_cka_table_and_bad_frames():
    sq = P.cka_pairwise().pivot(index="variant_a", columns="variant_b", values="cka")
    _assert_labelled(pr2011.plot_cka_heatmap(sq))
    with pytest.raises(DataError, match="lacks column"):
        pr1818.plot_damage_gap(pd.DataFrame({"seed": [1], "bpb": [1.0]}))
    with pytest.raises(DataError, match="no rows"):
        pr2011.plot_depth_trajectory(P.depth_trajectory().iloc[:0])
    with pytest.raises(DataError, match="unknown stage"):
        pr1818.plot_damage_gap(pd.DataFrame({"seed": [1], "stage": ["post-quant"], "bpb": [1.0]}))
    with pytest.raises(DataError, match="DataFrame"):
        pr1394.plot_seed_stages([1, 2, 3])
    with pytest.raises(ConfigError, match="unknown paper figure"):
        paper_figure("fig99")
