"""``qlab quantize`` and ``qlab eval`` end to end on a tiny run directory."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from qlab.cli import main
from qlab.config import ModelConfig
from qlab.model.gpt import GPT

CFG = ModelConfig(
    vocab_size=512, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
    loop_layers=None, train_seq_len=32, eval_seq_len=32,
)  # fmt: skip
POLICY = {
    "name": "tiny",
    "rules": [
        {"pattern": "tok_emb.weight", "spec": {"method": "gptq", "bits": 8, "clip_params": {"k": 20.0}}},
        {"pattern": "*", "ndim": 2, "min_numel": 1025,
         "spec": {"method": "gptq", "bits": 6, "clip_params": {"k": 12.85}}},
        {"pattern": "*", "spec": {"method": "passthrough"}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A minimal qlab run directory: config.json + model.safetensors."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.numel() > 1024:
                p.normal_(0.0, 0.05)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"), metadata={"step": "0"})
    (d / "config.json").write_text(json.dumps({"model": CFG.to_dict(), "train": {}, "step": 0}))
    (d / "policy.json").write_text(json.dumps(POLICY))
    return d


def _value(text: str, label: str) -> float:
    return float(re.search(rf"{label}\s+val_bpb ([0-9.]+)", text).group(1))


def test_quantize_then_eval_the_artifact(run_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "m.qlab"
    code = tmp_path / "train_gpt.py"
    code.write_text("print('hello')\n" * 50)
    args = ["quantize", str(run_dir), "--policy", str(run_dir / "policy.json"), "--out", str(out),
            "--data", str(tiny_dataset.root), "--calib-batches", "2", "--calib-batch-seqs", "2",
            "--eval-tokens", "600", "--stride", "16", "--code", str(code), "--top", "3"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert out.is_file()
    for needle in ("[artifact]", "[code]", "pre-quant:", "quantized:", "sliding:", "tok_emb.weight", "more"):
        assert needle in text, needle
    assert f"+ {len(code.read_text()):,} B code" in text
    quant = _value(text, "quantized:")

    assert main(["eval", str(out), "--data", str(tiny_dataset.root), "--max-tokens", "600"]) == 0
    evald = capsys.readouterr().out
    assert float(re.search(r"val_bpb:\s+([0-9.]+)", evald).group(1)) == pytest.approx(quant, abs=1e-4)

    # an existing --out is never overwritten without --force
    before = out.read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_quantize_solve_k_with_force(run_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "s.qlab"
    out.write_bytes(b"old")
    args = ["quantize", str(run_dir), "--policy", str(run_dir / "policy.json"), "--out", str(out), "--force",
            "--data", str(tiny_dataset.root), "--calib-batches", "1", "--calib-batch-seqs", "2",
            "--eval-tokens", "300", "--stride", "0",
            "--solve-k", "--cap", "56000", "--k-tol", "0.5"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    k = float(re.search(r"solved k:\s+([0-9.]+)", text).group(1))
    assert 4.0 < k < 40.0
    assert "sliding:" not in text
    assert out.stat().st_size <= 56000 and out.read_bytes()[:4] == b"QLAB"


def test_eval_run_dir_and_bad_flags(run_dir, tiny_dataset, capsys):
    assert (
        main(
            ["eval", str(run_dir), "--data", str(tiny_dataset.root), "--max-tokens", "300", "--stride", "16"]
        )
        == 0
    )
    assert "val_loss:" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--data", str(tiny_dataset.root), "--stride", "0"]) == 2
    assert "--stride" in capsys.readouterr().err


def test_record_quant_variables_set_quantize_defaults():
    import argparse

    from qlab.cli.quantize import _env_defaults

    args = argparse.Namespace(calib_batches=None, calib_batch_seqs=None, codec=None, policy="record")
    _env_defaults(args, {"GPTQ_CALIBRATION_BATCHES": "16", "COMPRESSOR": "lzma"})
    assert (args.calib_batches, args.calib_batch_seqs, args.codec) == (16, 48, "lzma-6")
    args = argparse.Namespace(calib_batches=None, calib_batch_seqs=None, codec=None, policy="record_small")
    _env_defaults(args, {})
    assert (args.calib_batches, args.calib_batch_seqs, args.codec) == (64, 8, "brotli-11")


def test_quantize_codec_ans_writes_the_symbol_coded_artifact(run_dir, tiny_dataset, tmp_path, capsys):
    outs = {}
    for codec in ("ans", "brotli-11"):
        outs[codec] = tmp_path / f"{codec}.qlab"
        args = ["quantize", str(run_dir), "--policy", str(run_dir / "policy.json"), "--out", str(outs[codec]),
                "--data", str(tiny_dataset.root), "--calib-batches", "1", "--calib-batch-seqs", "2",
                "--eval-tokens", "300", "--stride", "0", "--codec", codec]  # fmt: skip
        assert main(args) == 0
        text = capsys.readouterr().out
    from qlab.compress.container import read_artifact

    a, header = read_artifact(outs["ans"])
    b, _ = read_artifact(outs["brotli-11"])
    assert header["codec"] == "ans" and header["symbols"]["streams"]
    assert all(torch.equal(a[n].codes, b[n].codes) for n in a if hasattr(a[n], "codes"))
    assert "order-0" in text
    assert main(["eval", str(outs["ans"]), "--data", str(tiny_dataset.root), "--max-tokens", "300"]) == 0


def test_quantize_gptq_arithmetic_flag(run_dir, tiny_dataset, tmp_path, capsys):
    from qlab.compress.container import read_artifact

    out = tmp_path / "fast.qlab"
    args = ["quantize", str(run_dir), "--policy", str(run_dir / "policy.json"), "--out", str(out),
            "--data", str(tiny_dataset.root), "--calib-batches", "1", "--calib-batch-seqs", "2",
            "--eval-tokens", "300", "--stride", "0", "--gptq-arithmetic", "fast"]  # fmt: skip
    assert main(args) == 0
    entries, header = read_artifact(out)
    gptq = [v for v in entries.values() if hasattr(v, "codes") and v.meta.get("method") == "gptq"]
    assert gptq and all(v.meta["arithmetic"] == "fast" for v in gptq)
    with pytest.raises(SystemExit):  # not a choice: argparse refuses it
        main([*args[:-1], "quick", "--force"])
    assert "invalid choice" in capsys.readouterr().err
