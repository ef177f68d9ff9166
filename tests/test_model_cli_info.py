"""``qlab info``: preset description with exact parameter counts."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from qlab.cli import info
from qlab.config import ModelConfig
from qlab.errors import ConfigError


def run_info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qlab")
    info.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["info", *argv])
    return args.func(args)


def test_info_record(capsys):
    assert run_info(["--preset", "record"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 35,943,512" in out
    for f in dataclasses.fields(ModelConfig):
        assert f"  {f.name} = " in out
    assert "loop_layers = (4, 5)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "%" in line}
    assert set(lines) == {"embedding", "attention", "mlp", "control"}
    assert "4,194,304" in lines["embedding"]  # 8192 x 512 tied table
    # 11 x (2048 x 512 x 2)
    assert "23,068,672" in lines["mlp"]
    # 11 x (2 x 512 x 512 + 2 x 512 x 256 + 8)
    assert "8,650,840" in lines["attention"]
    # 11 x 4 x 512 + 2 x 7 x 512
    assert "29,696" in lines["control"]


def test_info_tiny_and_baseline(capsys):
    run_info(["--preset", "tiny"])
    assert "parameters: 723,984" in capsys.readouterr().out
    run_info(["--preset", "baseline"])
    assert "parameters: 17,059,912" in capsys.readouterr().out


def test_info_list(capsys):
    run_info(["--list"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["baseline", "record", "tiny"]
    assert "17,059,912" in out[0] and "35,943,512" in out[1]


def test_info_unknown_preset():
    with pytest.raises(ConfigError, match="baseline, record, tiny"):
        run_info(["--preset", "nope"])


def test_info_lists_policies_and_regularizers(capsys):
    from qlab.quant.policy import POLICIES
    from qlab.train.regularizers import REGULARIZERS

    assert run_info(["--policies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in POLICIES)
    assert "record         tok_emb.weight: gptq int8 sdclip k=20; * (>65,536 el.): gptq int6" in out
    assert run_info(["--regularizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in lines} == set(REGULARIZERS)
    assert all(len(line.split()) > 1 for line in lines)  # each with its one-line description
