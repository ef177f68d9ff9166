"""Checkpoints named as GPT-2, BERT and Llama name them: families, fingerprint, sweep, entropy."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from qlab.analysis.rd import tensor_family
from qlab.analysis.spectra import layer_index, weight_family
from qlab.cli import command_help, commands, main
from qlab.quant.policy import NothingQuantizedWarning, get_policy, quantize_state_dict

D, FF, VOCAB, LAYERS = 96, 192, 300, 2  # every matrix above the sweep's 4,096-element floor


def _state(scheme: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    if scheme == "bert":
        sd = {"embeddings.word_embeddings.weight": r(VOCAB, D), "embeddings.LayerNorm.weight": torch.ones(D)}
        for i in range(LAYERS):
            p = f"encoder.layer.{i}."
            sd |= {p + "attention.self.query.weight": r(D, D), p + "attention.self.key.weight": r(D, D),
                   p + "attention.self.value.weight": r(D, D), p + "attention.output.dense.weight": r(D, D),
                   p + "intermediate.dense.weight": r(FF, D), p + "output.dense.weight": r(D, FF),
                   p + "attention.self.query.bias": r(D)}  # fmt: skip
    elif scheme == "llama":
        sd = {
            "model.embed_tokens.weight": r(VOCAB, D),
            "lm_head.weight": r(VOCAB, D),
            "model.norm.weight": torch.ones(D),
        }
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            sd |= {p + "self_attn.q_proj.weight": r(D, D), p + "self_attn.k_proj.weight": r(D // 2, D),
                   p + "self_attn.v_proj.weight": r(D // 2, D), p + "self_attn.o_proj.weight": r(D, D),
                   p + "mlp.gate_proj.weight": r(FF, D), p + "mlp.up_proj.weight": r(FF, D),
                   p + "mlp.down_proj.weight": r(D, FF)}  # fmt: skip
            sd[p + "input_layernorm.weight"] = torch.ones(D)
    else:
        sd = {"transformer.wte.weight": r(VOCAB, D), "transformer.wpe.weight": r(64, D)}
        for i in range(LAYERS):
            p = f"transformer.h.{i}."
            sd |= {p + "attn.c_attn.weight": r(D, 3 * D), p + "attn.c_proj.weight": r(D, D),
                   p + "mlp.c_fc.weight": r(D, FF), p + "mlp.c_proj.weight": r(FF, D),
                   p + "ln_1.weight": torch.ones(D)}  # fmt: skip
    return sd


EXPECTED = {
    "bert": {"q", "k", "v", "attn_out", "mlp_in", "mlp_out", "embedding"},
    "llama": {"q", "k", "v", "attn_out", "mlp_gate", "mlp_in", "mlp_out", "embedding"},
    "gpt2": {"qkv", "attn_out", "mlp_in", "mlp_out", "embedding"},
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model.safetensors"
    save_file(_state(request.param), str(path))
    return request.param, path


def test_names_map_to_families_and_layers():
    for scheme, fams in EXPECTED.items():
        sd = _state(scheme)
        assert {weight_family(n) for n in sd} - {None} == fams, scheme
        blocks = [n for n in sd if weight_family(n) not in (None, "embedding")]
        assert {layer_index(n) for n in blocks} == set(range(LAYERS)), scheme
    # BERT's attention output is not its MLP output, though both end in output.dense
    assert weight_family("encoder.layer.0.attention.output.dense.weight") == "attn_out"
    assert weight_family("encoder.layer.0.output.dense.weight") == "mlp_out"
    assert weight_family("encoder.layer.0.attention.output.LayerNorm.weight") is None
    assert tensor_family("model.layers.3.mlp.gate_proj.weight") == "mlp"
    assert tensor_family("transformer.h.0.attn.c_attn.weight") == "attention"
    assert tensor_family("some.unknown.matrix") == "other"


def test_fingerprint_names_the_families(checkpoint, tmp_path):
    scheme, path = checkpoint
    assert main(["fingerprint", str(path), "--out", str(tmp_path / "fp"), "--no-progress"]) == 0
    summary = pd.read_csv(tmp_path / "fp" / "family_summary.csv")
    assert set(summary["family"]) == EXPECTED[scheme]


def test_sweep_and_entropy_name_the_families(checkpoint, tmp_path, capsys):
    scheme, path = checkpoint
    out = tmp_path / "sw"
    args = ["sweep", str(path), "--bits", "6", "--k", "10,12", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = pd.read_csv(out / "sweep.csv")
    assert {"attention", "mlp", "embedding"} <= set(table["family"])
    assert set(table.loc[table["family"] == "other", "name"]) <= {"transformer.wpe.weight"}  # positions
    assert main(["entropy", str(path), "--policy", "record_small"]) == 0
    assert "predicted" in capsys.readouterr().out


def test_a_policy_that_quantizes_nothing_says_so(checkpoint, capsys):
    _, path = checkpoint
    sd = _state("llama")
    with pytest.warns(NothingQuantizedWarning, match="leaves all .* matrices unquantized"):
        quantize_state_dict(sd, get_policy("record"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # record_small quantizes these: no warning
        quantize_state_dict(sd, get_policy("record_small"))
    assert main(["entropy", str(path), "--policy", "record"]) == 0
    assert "qlab: warning: policy 'record' leaves all" in capsys.readouterr().err


def test_cli_version_and_help_without_importing_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("qlab ")
    assert all(command_help(name) for name in commands())  # every command has its HELP
    probe = "import sys; from qlab.cli import build_parser; build_parser(''); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_top_level_api_in_one_import(checkpoint, tmp_path):
    import qlab
    from qlab.quant.tensor import QuantizedTensor

    scheme, path = checkpoint
    assert set(qlab.__all__) <= set(dir(qlab))
    state = qlab.load(path)
    assert set(state) == set(_state(scheme))
    report = qlab.entropy(path, policy="record_small")
    assert report.totals["predicted_bytes"] > 0 and len(report.table) == len(state)
    table = qlab.analyze(path)
    assert set(table["family"]) - {"other"} == EXPECTED[scheme]
    quantized = qlab.quantize(path, policy="record_small", out=tmp_path / "m.qlab", codec="ans")
    assert any(isinstance(v, QuantizedTensor) for v in quantized.values())
    assert set(qlab.load(tmp_path / "m.qlab")) == set(state)
    assert {"bits", "k", "entropy"} <= set(qlab.sweep(path, bits=[6], ks=[12.0]).columns)
    with pytest.raises(AttributeError):
        _ = qlab.no_such_function


def test_every_flag_of_every_command_has_help():
    import argparse
    import importlib

    missing, markup = [], []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        text = parser.format_help()
        if "``" in text or ":func:" in text or ":class:" in text:  # help is plain text
            markup.append(" ".join(path))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])
            elif action.help is None and action.dest != "help":
                missing.append(" ".join(path) + " " + "/".join(action.option_strings or [action.dest]))

    for name in commands():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"qlab.cli.{name}").register(sub)
        for command, parser in sub.choices.items():
            walk(parser, [command])
    assert not missing, missing
    assert not markup, markup


def test_weight_only_figures_on_a_third_party_checkpoint(checkpoint, tmp_path):
    from qlab.errors import CheckpointError
    from qlab.figures import Workspace, generate_figures
    from qlab.figures.registry import FIGURES, WEIGHT_ONLY_FIGURES

    scheme, path = checkpoint
    # every weight-only figure on one naming scheme (its builders must never need the model)
    few = ["pr2011_svd_spectrum", "pr1394_quantization_example", "pr1818_sparsity_24"]
    wanted = sorted(WEIGHT_ONLY_FIGURES) if scheme == "llama" else few
    written = generate_figures(tmp_path / "figs", checkpoint=path, scale="smoke", only=wanted,
                               work_dir=tmp_path / "work", progress=False)  # fmt: skip
    assert list(written["id"]) == wanted and (written["bytes"] > 10_000).all()
    ws = Workspace(path, "smoke", work_dir=tmp_path / "work", progress=False)
    assert ws.weights_only and ws.largest_matrix()[0] in _state(scheme)
    assert weight_family(ws.largest_matrix()[0]) != "embedding"
    with pytest.raises(CheckpointError, match="weights only"):
        ws.model  # noqa: B018 — a figure that needs the model says why it cannot run
    assert set(FIGURES) >= WEIGHT_ONLY_FIGURES and all(FIGURES[f].weights_only for f in WEIGHT_ONLY_FIGURES)
