"""Fingerprint figures: every plot function on real (small-model) fingerprint tables."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from qlab.analysis.fingerprint import activation_fingerprint, weight_fingerprint
from qlab.config import get_preset
from qlab.errors import DataError
from qlab.model.gpt import GPT
from qlab.plots import fingerprints as fp
from qlab.plots.style import has_unit

MC = get_preset("tiny").replace(
    vocab_size=256, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, rope_dims=8, loop_layers=None,
    train_seq_len=32, eval_seq_len=32,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: extra threads only add contention on a busy 2-core machine. Module
    # scope, so the module-scoped fixtures below run single-threaded too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def results() -> dict[str, pd.DataFrame]:
    torch.manual_seed(0)
    model = GPT(MC)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(0.0, 0.05)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, MC.vocab_size, (3, 32))
    targets = torch.randint(0, MC.vocab_size, (3, 32))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    weights = weight_fingerprint(sd, quantized={k: v.detach() for k, v in noisy.state_dict().items()})
    acts = activation_fingerprint(
        model, idx, targets, quantized_model=noisy, sensitivity=lambda n, w: w + 0.01 * torch.randn_like(w)
    )
    return weights | acts


PLOTS = {  # function: table
    fp.plot_svd_spectrum: "family_spectra",
    fp.plot_svd_flatness: "family_summary",
    fp.plot_svd_differential: "spectral_differential",
    fp.plot_spectral_layers: "spectral_summary",
    fp.plot_pca3: "pca3",
    fp.plot_coord_distribution: "coord_hist",
    fp.plot_norm_distribution: "norm_hist",
    fp.plot_logit_lens: "depth",
    fp.plot_layer_sensitivity: "sensitivity",
    fp.plot_cka_layers: "cka_layers",
    fp.plot_hidden_quant: "hidden_quant",
}


def _visible_axes(fig: Figure) -> list:
    # colour bars are axes too; they carry their label on one side only
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


@pytest.mark.parametrize("plot", list(PLOTS), ids=lambda f: f.__name__)
def test_plot_returns_labelled_figure(plot, results):
    fig = plot(results[PLOTS[plot]])
    assert isinstance(fig, Figure)
    axes = _visible_axes(fig)
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), (plot.__name__, ax.get_title())
        assert ax.get_title().strip()
        assert ax.has_data()
    assert fig.get_suptitle() or len(axes) == 1


def test_cka_across_uses_pairs(results):
    fig = fp.plot_cka_layers(results["cka_across"])
    titles = [ax.get_title() for ax in _visible_axes(fig)]
    assert titles == ["model (rows) vs quantized (columns)"]


def test_spectrum_panels_are_log_and_span_two_decades(results):
    fig = fp.plot_svd_spectrum(results["family_spectra"])
    axes = _visible_axes(fig)
    assert len(axes) == results["family_spectra"]["family"].nunique() == 7
    for ax in axes:
        assert ax.get_yscale() == "log" and has_unit(ax.get_ylabel())
        lo, hi = ax.get_ylim()
        assert hi / lo >= 100


def test_flatness_bars_show_table_values(results):
    table = results["family_summary"]
    fig = fp.plot_svd_flatness(table)
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert np.allclose(heights, sorted(table["flatness"]))
    assert fig.axes[0].get_ylim()[0] == 0  # bars from zero


def test_sensitivity_bars_in_milli_units(results):
    sens = results["sensitivity"]
    fig = fp.plot_layer_sensitivity(sens)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert np.allclose(heights, 1e3 * sens["delta_bits_per_token"])
    assert "mbit/token" in fig.axes[0].get_ylabel()


def test_logit_lens_marks_looped_blocks():
    df = pd.DataFrame({"position": [0, 1, 2, 3], "block": [0, 1, 1, 2], "lens_bpb": [3.0, 2.5, 2.2, 2.0]})
    fig = fp.plot_logit_lens(df)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0\nb0", "1\nb1", "2\nb1", "3\nb2"]
    assert "bits/byte" in ax.get_ylabel()


def test_degenerate_norm_histogram_is_not_zoomed():
    # all norms equal (e.g. states right after an RMSNorm without gain): keep a readable x range
    df = pd.DataFrame({"bin_left": [8.0 - 1e-9], "bin_right": [8.0 + 1e-9], "count": [100]})
    ax = fp.plot_norm_distribution(df).axes[0]
    lo, hi = ax.get_xlim()
    assert hi - lo > 0.5


def test_missing_columns_raise(results):
    with pytest.raises(DataError, match="sigma_norm"):
        fp.plot_svd_spectrum(results["family_summary"])
    with pytest.raises(DataError, match="lens_"):
        fp.plot_logit_lens(pd.DataFrame({"position": [0]}))
    with pytest.raises(DataError):
        fp.plot_svd_differential(results["spectral_differential"], smooth=0)


def test_render_saves_small_pngs(results, tmp_path):
    subset = {k: results[k] for k in ("family_spectra", "pca3", "depth")}
    paths = fp.render_fingerprint_figures(subset | {"meta": pd.DataFrame({"key": ["a"]})}, tmp_path)
    names = [p.name for p in paths]
    assert names == [
        "pr2011_svd_spectrum.png",
        "pr2011_3d_pca.png",
        "pr2011_depth_trajectory.png",
        "pr2011_logit_lens.png",
    ]
    for p in paths:
        assert 10_000 < p.stat().st_size < 300_000


def test_pca3_variants_share_one_basis_and_the_shift_panel_measures_it(results):
    pca = results["pca3"]
    assert set(pca["basis"]) == {"model"}  # every variant on the model's axes
    shifts = fp._pca_shifts(pca, list(dict.fromkeys(pca["variant"])))
    assert set(shifts) == {"quantized"} and (shifts["quantized"] > 0).all()
    ref = pca[pca.variant == "model"].set_index("token")[["pc1", "pc2", "pc3"]]
    cur = pca[pca.variant == "quantized"].set_index("token")[["pc1", "pc2", "pc3"]]
    radius = np.sqrt((ref**2).sum(axis=1).mean())
    assert shifts["quantized"][0] == pytest.approx(np.linalg.norm(cur.iloc[0] - ref.iloc[0]) / radius)
    fig = fp.plot_pca3(pca)
    assert any("shift against model" in ax.get_title() for ax in fig.axes)


def test_svd_spectrum_names_the_gap_between_coinciding_curves(results):
    spectra = results["family_spectra"]
    variants = list(dict.fromkeys(spectra["variant"]))
    fam = spectra["family"].iloc[0]
    note = fp._spectrum_gap_note(spectra[spectra.family == fam], variants)
    rows = spectra[spectra.family == fam]
    ref = rows[rows.variant == variants[0]].set_index("index")["sigma_norm"]
    cur = rows[rows.variant == variants[1]].set_index("index")["sigma_norm"]
    gap = 100 * (cur / ref - 1).abs().max()
    assert f"max {gap:.2g} %" in note
