"""The record's own outputs: final_model.pt and its .int6.ptz, read by eval / entropy / quantize.

The files are written here in PR #1394's formats: ``torch.save(state_dict)`` with the
bf16 ``tok_emb`` it trains, and ``brotli11(BSHF(torch.save({"w": …, "m": …})))`` whose
per-tensor info is a plain string ("gptq (int6)", "passthrough (float16)")."""

from __future__ import annotations

import io
import re

import brotli
import pytest
import torch

from qlab.cli import main
from qlab.compress.ptz import load_ptz_bytes, ptz_tree
from qlab.compress.shuffle import shuffle
from qlab.config import get_preset
from qlab.model.gpt import GPT
from qlab.model.infer import infer_model_config, model_shapes
from qlab.quant.model_quant import quantize_model
from qlab.quant.policy import record_policy


def _record_config(vocab: int):
    # record-shaped (loop 4-5 of 6 layers, XSA, gates), CPU-sized
    return get_preset("record").replace(
        vocab_size=vocab, num_layers=6, model_dim=64, num_heads=2, num_kv_heads=1, rope_dims=16,
        train_seq_len=64, eval_seq_len=64,
    )  # fmt: skip


def _record_quantize(sd):
    """The record's serialised tree: int6 rows for big matrices, fp16 for the rest."""
    w, m = {}, {}
    for name, t in sd.items():
        t = t.detach().float()
        if t.numel() <= 2048:
            w[name], m[name] = t.to(torch.float16), "passthrough (float16)"
            continue
        bits = 8 if "tok_emb" in name else 6
        r = 2 ** (bits - 1) - 1
        s = (12.85 * t.std(dim=1) / r).clamp_min(1e-10).to(torch.float16)
        w[name + ".q"] = torch.clamp(torch.round(t / s.float()[:, None]), -r, r).to(torch.int8)
        w[name + ".scale"], m[name] = s, f"gptq (int{bits})"
    return {"w": w, "m": m}


def _record_dequantize(tree, template):
    """The record's dequantize rule: 'passthrough' in the info → as stored, else q·s per row."""
    out = {}
    for name, orig in template.items():
        info = tree["m"][name]
        if "passthrough" in info:
            out[name] = tree["w"][name].to(orig.dtype)
        else:
            q, s = tree["w"][name + ".q"], tree["w"][name + ".scale"]
            out[name] = (q.float() * s.float().view(q.shape[0], 1)).to(orig.dtype)
    return out


@pytest.fixture(scope="module")
def record_files(tiny_dataset, tmp_path_factory):
    d = tmp_path_factory.mktemp("record")
    torch.manual_seed(0)
    model = GPT(_record_config(tiny_dataset.vocab_size))
    sd = model.state_dict()
    sd["tok_emb.weight"] = sd["tok_emb.weight"].to(torch.bfloat16)  # as the record trains it
    torch.save(sd, d / "final_model.pt")
    buf = io.BytesIO()
    torch.save(_record_quantize(model.state_dict()), buf)
    (d / "final_model.int6.ptz").write_bytes(brotli.compress(shuffle(buf.getvalue()), quality=11))
    return d, model


def test_config_is_inferred_from_the_shapes(record_files, tiny_dataset):
    _, model = record_files
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inferred = infer_model_config(shapes)
    assert inferred.train_seq_len == 2048  # lengths are not in the shapes: the preset's
    assert inferred.replace(train_seq_len=64, eval_seq_len=64) == model.config
    assert model_shapes(infer_model_config(shapes)) == shapes


def test_eval_entropy_quantize_accept_the_records_files(record_files, tiny_dataset, tmp_path, capsys):
    d, _ = record_files
    data = str(tiny_dataset.root)
    bpb = {}
    for name in ("final_model.pt", "final_model.int6.ptz"):
        args = ["eval", str(d / name), "--data", data, "--max-tokens", "1000", "--seq-len", "64"]
        assert main(args) == 0, name
        bpb[name] = float(re.search(r"val_bpb:\s*([0-9.]+)", capsys.readouterr().out).group(1))
        assert main(["entropy", str(d / name), "--json", str(tmp_path / f"{name}.json")]) == 0, name
    assert abs(bpb["final_model.pt"] - bpb["final_model.int6.ptz"]) < 0.05  # int6 of random init
    out = tmp_path / "model.qlab"
    assert main(["quantize", str(d / "final_model.pt"), "--data", data, "--policy", "record_small",
                 "--calib-batches", "1", "--calib-batch-seqs", "2", "--eval-tokens", "600",
                 "--stride", "0", "--seq-len", "64", "--out", str(out)]) == 0  # fmt: skip
    assert out.exists()


def test_qlab_ptz_tree_decodes_with_the_records_rule(record_files, tiny_dataset):
    _, model = record_files
    qm = quantize_model(model, record_policy("record_small"))
    tree = ptz_tree(qm.quantized_state)
    assert all(isinstance(v, str) for v in tree["m"].values())
    buf = io.BytesIO()
    torch.save(tree, buf)
    back = load_ptz_bytes(brotli.compress(shuffle(buf.getvalue()), quality=5))
    own = {k: v for k, v in model.state_dict().items() if k in tree["m"]}
    theirs = _record_dequantize(back, own)
    ours = qm.dequantized_model.state_dict()
    for k in theirs:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=1e-3 * float(ours[k].abs().max()) + 1e-6)


def test_record_path_a_artifacts_read_as_tensors(record_files, tmp_path):
    from qlab.loaders import save_quantized
    from qlab.loaders.readers import load_state_dict

    _, model = record_files
    policy = record_policy("record_pathA")
    qm = quantize_model(model, policy)
    save_quantized(tmp_path / "a.qlab", qm, policy)
    sd = load_state_dict(tmp_path / "a.qlab")
    ours = qm.dequantized_model.state_dict()
    for name in ("blocks.0.attn_scale", "skip_gates"):
        torch.testing.assert_close(sd[name].float(), ours[name].float())
