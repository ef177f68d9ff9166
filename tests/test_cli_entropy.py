"""``qlab entropy`` and ``qlab sweep`` end to end on a small safetensors checkpoint."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from qlab.cli import main
from qlab.cli.entropy import human_bytes
from qlab.cli.sweep import parse_ks


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    sd = {
        "tok_emb.weight": 0.05 * torch.randn(512, 160, generator=g),
        "blocks.0.mlp.fc.weight": 0.02 * torch.randn(384, 192, generator=g),
        "blocks.0.attn.c_q.weight": 0.03 * torch.randn(320, 224, generator=g),
        "blocks.0.attn_scale": torch.ones(192),
    }
    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    save_file(sd, str(path))
    return path


def test_entropy_cli_table_json_csv(ckpt, tmp_path, capsys):
    rc = main([
        "entropy", str(ckpt), "--policy", "rtn_int6", "--measure", "--codecs", "brotli-11+shuffle,zstd-19",
        "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"), "--code-bytes", "15516",
        "--no-progress",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "blocks.0.mlp.fc.weight" in out and "16,000,000-byte cap" in out and "prediction error" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["code_bytes"] == 15516 and data["totals"]["fits"]
    assert set(data["totals"]["real_bytes"]) == {"brotli-11+shuffle", "zstd-19"}
    assert abs(data["totals"]["prediction_error"]) < 0.01
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == 4 and set(table.loc[table["numel"] > 65536, "bits"]) == {6}


def test_entropy_cli_top_sort_and_families(ckpt, capsys):
    assert (
        main(
            [
                "entropy",
                str(ckpt),
                "--policy",
                "rtn_int6",
                "--top",
                "2",
                "--sort",
                "predicted",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["tok_emb.weight", "blocks.0.mlp.fc.weight"]
    assert "... 2 more tensors" in table[3]
    assert "methods: rtn 3, fp16 1" in out
    assert main(["entropy", str(ckpt), "--policy", "rtn_int6", "--by-family", "--no-progress"]) == 0
    rows = {
        line.split()[0]: line.split() for line in capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]
    }
    assert set(rows) == {"embedding", "mlp", "attention", "control"} and rows["attention"][1] == "1"
    assert main(["entropy", str(ckpt), "--top", "0"]) == 2


def test_entropy_cli_errors(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("not a checkpoint")
    assert main(["entropy", str(tmp_path / "x.txt"), "--no-progress"]) == 2
    assert "x.txt" in capsys.readouterr().err
    assert main(["entropy", str(tmp_path / "x.txt"), "--code-bytes", "-1"]) == 2


def test_human_bytes_and_parse_ks():
    assert (
        human_bytes(15_984_924) == "15.98 MB"
        and human_bytes(512) == "512 B"
        and human_bytes(2500) == "2.50 kB"
    )
    assert parse_ks("6:10:2") == [6.0, 8.0, 10.0] and parse_ks("8,12.85") == [8.0, 12.85]
    for bad in ("6:4:1", "a,b", "0,3"):
        with pytest.raises(Exception, match="--k"):
            parse_ks(bad)


def test_sweep_cli_writes_csv_and_figures(ckpt, tmp_path, capsys):
    out = tmp_path / "sw"
    rc = main(["sweep", str(ckpt), "--bits", "4,6", "--k", "8:16:4", "--max-rows", "64", "--out", str(out),
               "--no-progress"])  # fmt: skip
    assert rc == 0 and "R²" in capsys.readouterr().out
    for name in ("sweep", "summary", "sdclip_vs_quantile", "bk_equivalence", "std_vs_ratio", "rd_curve"):
        assert len(pd.read_csv(out / f"{name}.csv")) > 0
    for fig in ("entropy_vs_k", "std_vs_ratio", "rd_curves", "sdclip_vs_quantile"):
        assert (out / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    sweep = pd.read_csv(out / "sweep.csv")
    assert len(sweep) == 3 * 2 * (3 + 1)  # 3 matrices × 2 bit widths × (3 ks + quantile search)
