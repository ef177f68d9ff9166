"""``qlab figures`` at smoke scale: every registered figure is written as a small valid PNG,
and the measured tables behind them agree with each other where they must.

The smoke workspace (a 2-layer d48 model trained 40 steps, every table) is built once per
test session under pytest's base temp dir; ``tests/test_notebooks.py`` reuses it.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from qlab.cli import main
from qlab.errors import CheckpointError, ConfigError
from qlab.figures import FIGURES, NOTEBOOKS, Workspace, figure_policy, figure_table, generate_figures
from qlab.figures import tables as T
from qlab.plots.style import MAX_PNG_BYTES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.slow  # builds the smoke workspace (~45 s once per session)

REPO = Path(__file__).resolve().parent.parent


def smoke_work_dir(tmp_path_factory) -> Path:
    """One cache for the whole session (shared with the notebook tests)."""
    return tmp_path_factory.getbasetemp() / "qlab_figures_smoke"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = smoke_work_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("figures_out")
    df = generate_figures(out, scale="smoke", work_dir=work)
    return df, out, Workspace(None, "smoke", work_dir=work)


def test_every_figure_is_a_small_valid_png(smoke):
    df, out, _ = smoke
    assert list(df["id"]) == list(FIGURES)
    for fid in FIGURES:
        path = out / f"{fid}.png"
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, fid
        assert 1000 < len(data) < MAX_PNG_BYTES, (fid, len(data))
    assert (df["bytes"] == [(out / f"{i}.png").stat().st_size for i in df["id"]]).all()
    assert (df["seconds"] >= 0).all()


def test_cli_redraws_from_the_cache_and_lists(smoke, tmp_path, capsys):
    _, _, ws = smoke
    ids = ["pr1394_entropy_vs_k", "paper_pr1818_damage_gap"]
    rc = main(
        [
            "figures",
            "--scale",
            "smoke",
            "--work-dir",
            str(ws.work.parent),
            "--out",
            str(tmp_path),
            "--quiet",
            "--only",
            *ids,
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.png" for i in ids)
    assert "2 figures written" in capsys.readouterr().out
    assert main(["figures", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(fid in listed for fid in FIGURES) and f"{len(FIGURES)} figures" in listed


def test_bad_requests_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown figure id 'nope'"):
        generate_figures(tmp_path, only=["nope"])
    with pytest.raises(ConfigError, match="unknown figure scale"):
        Workspace(None, "huge")
    with pytest.raises(CheckpointError, match="holds no checkpoint qlab can read"):
        Workspace(tmp_path, "smoke")
    assert main(["figures", "--only", "nope", "--out", str(tmp_path)]) == 2


def _draws(spec, src: str) -> bool:
    """The cell draws ``spec`` with its table and plot calls spelled out (FigureSpec.code)."""
    lines = set(src.splitlines())
    body = [ln for ln in spec.code(True).splitlines() if ln and not ln.startswith(("from ", "display("))]
    return spec.code().splitlines()[-1] in lines or set(body) <= lines


def test_registry_points_at_real_functions_and_notebooks():
    table = figure_table()
    assert table["id"].is_unique and len(table) == len(FIGURES)
    for spec in FIGURES.values():
        module, name = spec.function.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name)), spec.function
        assert (REPO / NOTEBOOKS[spec.notebook]).is_file(), spec.notebook
    shown = set()
    for nb in NOTEBOOKS.values():
        cells = json.loads((REPO / nb).read_text())["cells"]
        for cell in cells:
            src = "".join(cell["source"])
            shown |= {part.split('"]')[0] for part in src.split('FIGURES["')[1:]}
            shown |= {f for f, spec in FIGURES.items() if _draws(spec, src)}
            assert not cell.get("outputs"), f"{nb} is committed with outputs"
    assert shown <= set(FIGURES), shown - set(FIGURES)
    # every figure's cell spells its drawing out (no opaque FIGURES[id].build(ws) left)
    assert not [f for f, spec in FIGURES.items() if spec.code().startswith("FIGURES[")]
    assert shown == set(FIGURES), f"figures no notebook shows: {set(FIGURES) - shown}"


def test_figure_policy_gptqs_the_matrices_of_a_small_model(smoke):
    _, _, ws = smoke
    pol = figure_policy()
    for name, t in ws.state_dict.items():
        method = pol.spec_for(name, t).method
        assert method == ("gptq" if t.dim() == 2 and t.numel() > 4096 else "passthrough"), (name, method)
    assert ws.quantized.hessians_used
    assert set(ws.quantized.meta["gptq_tensors"]) == set(ws.hessians)


def test_tables_agree_with_each_other(smoke):
    _, _, ws = smoke
    stages = T.stages(ws).iloc[0]
    runs = T.ttt_optimizers(ws)
    no_ttt = runs[runs["optimizer"].str.startswith("no TTT")]
    # lr 0 score-first TTT scores the same sliding windows of the same GPTQ model as the pipeline
    assert math.isclose(float(no_ttt["final_bpb"].iloc[0]), float(stages["sliding_bpb"]), rel_tol=1e-9)
    gap = T.damage_gap(ws)
    ours = gap[gap["source"] == "qlab"].set_index("stage")["bpb"]
    assert ours["quantized"] == pytest.approx(stages["quantized_bpb"])
    assert ours["legal_ttt"] == pytest.approx(stages["ttt_bpb"])
    assert set(gap["source"]) == {"qlab", "paper:pr1818"}
    # the paper's PR #639 quantization gaps in mBPB (0.008 and 0.004 bpb)
    qg = T.quant_gap(ws)
    assert sorted(qg[qg["source"] == "paper:pr639"]["gap_mbpb"].round(6)) == [4.0, 8.0]
    assert len(qg[qg["source"] == "qlab"]) == len(T.GAP_METHODS)


def test_quant_example_and_sparsity_tables(smoke):
    _, _, ws = smoke
    ex = T.quant_example(ws)
    for panel, g in ex[ex["panel"] != "weights"].groupby("panel"):
        assert g["fraction"].sum() == pytest.approx(1.0), panel
    assert len(ex[ex["panel"] == "int5"]) == 31 and len(ex[ex["panel"] == "int4"]) == 15
    assert len(ex[ex["panel"] == "nf4"]) == 16
    sp = T.sparsity(ws).set_index("scheme")
    assert sp.loc["int6", "nominal_bits_per_block"] == 24 and sp.loc["2:4", "nominal_bits_per_block"] == 10
    # 2:4 drops half the weights: its error must exceed int6's
    assert sp.loc["2:4", "rel_mse"] > sp.loc["int6", "rel_mse"] > 0
    cur = T.curriculum()
    assert cur.groupby("frac")["prob"].sum().to_numpy() == pytest.approx(1.0)


def test_table_cache_builds_once_and_survives_damage(tmp_path):
    ws = Workspace(None, "smoke", work_dir=tmp_path)
    calls = []

    def build() -> pd.DataFrame:
        calls.append(1)
        return pd.DataFrame({"a": [1.0, math.nan], "b": ["x", "y"]})

    first = ws.table("t", build)
    again = Workspace(None, "smoke", work_dir=tmp_path).table("t", build)  # from disk
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, again)
    (ws.work / "tables" / "t.json").write_text("{not json")
    Workspace(None, "smoke", work_dir=tmp_path).table("t", build)
    assert len(calls) == 2


def test_every_figure_writer_names_files_by_the_figures_ids(tmp_path):
    from qlab.plots.fingerprints import figure_makers
    from qlab.plots.paper_figures import PAPER_FIGURES, render_paper_figures

    (path,) = render_paper_figures(tmp_path, ["pr2011_cka_heatmap"])
    assert path.stem in FIGURES
    assert {f"paper_{name}" for name in PAPER_FIGURES} <= set(FIGURES)
    stems = {Path(file).stem for pairs in figure_makers().values() for file, _ in pairs}
    unregistered = stems - set(FIGURES)  # drawn by `qlab fingerprint` only, named the same way
    assert unregistered == {"pr2011_spectral_layers", "pr2011_layer_sensitivity", "pr2011_cka_across"}
