"""KL, top-1 agreement and Δ log-likelihood of a model against its reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from trainkit import model_config

from qlab.eval.agreement import (
    agreement_summary,
    docs_to_resolve,
    document_sums,
    ratio_interval,
    token_agreement,
    token_kl_bits,
)
from qlab.eval.bpb import evaluate_bpb
from qlab.model.gpt import GPT


def test_kl_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    by_hand = 0.5 * math.log2(0.5 / 0.25) + 0.25 * math.log2(1.0) + 0.25 * math.log2(0.25 / 0.5)
    assert token_kl_bits(p.log(), q.log()).item() == pytest.approx(by_hand)  # 0.25 bits
    assert token_kl_bits(p.log() + 7.0, q.log() - 3.0).item() == pytest.approx(by_hand)  # logits: shift-free
    assert token_kl_bits(q.log(), q.log()).item() == 0.0


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    torch.manual_seed(0)
    ref = GPT(model_config(512, loop=False))
    other = GPT(model_config(512, loop=False))
    other.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(0.5 * torch.randn_like(p))
    return ref, other


def test_a_model_against_itself(models, tiny_dataset):
    from qlab.data import build_byte_tables, load_tokenizer, load_validation_tokens

    ref, _ = models
    tokens = load_validation_tokens(tiny_dataset.val_files, 32)[:2049]
    tables = build_byte_tables(load_tokenizer(tiny_dataset.tokenizer_path))
    ta = token_agreement(ref, ref, tokens, tables, seq_len=32)
    assert float(ta.kl_bits.abs().max()) == 0.0 and bool(ta.top1.all())
    s = agreement_summary(ta, tokens, n_boot=200)
    assert s["kl_bpb"] == 0.0 and s["top1"] == 1.0 and s["delta_bpb"] == 0.0


def test_agreement_matches_the_evaluator_and_a_slow_loop(models, tiny_dataset):
    from qlab.data import build_byte_tables, load_tokenizer, load_validation_tokens

    ref, other = models
    tokens = load_validation_tokens(tiny_dataset.val_files, 32)[:2049]
    tables = build_byte_tables(load_tokenizer(tiny_dataset.tokenizer_path))
    ta = token_agreement(other, ref, tokens, tables, seq_len=32, batch_seqs=5)
    a = evaluate_bpb(other, tokens, tables, seq_len=32)
    b = evaluate_bpb(ref, tokens, tables, seq_len=32)
    s = agreement_summary(ta, tokens, n_boot=300)
    # the evaluator's NLL is float32 cross-entropy, agreement's float64: equal to float32 precision
    assert s["delta_bpb"] == pytest.approx(a.val_bpb - b.val_bpb, rel=1e-6)
    assert s["tokens"] == a.tokens and s["bytes"] == a.bytes
    # one window by hand: softmax, KL in bits, argmax
    x = tokens[:32].unsqueeze(0)
    with torch.no_grad():
        p = torch.softmax(ref(x).double(), -1)[0]
        q = torch.softmax(other(x).double(), -1)[0]
    slow = [sum(float(p[t, v] * math.log2(p[t, v] / q[t, v])) for v in range(p.shape[1])) for t in range(3)]
    assert ta.kl_bits[:3].tolist() == pytest.approx(slow, rel=1e-9)
    assert ta.top1[:32].tolist() == (p.argmax(-1) == q.argmax(-1)).tolist()
    assert 0 < s["kl_bpb_lo"] <= s["kl_bpb"] <= s["kl_bpb_hi"] and 0 < s["top1"] < 1


def test_ratio_interval_and_documents_needed_by_hand():
    num = np.array([1.0, 2.0, 3.0, 6.0])
    den = np.array([1.0, 1.0, 1.0, 1.0])
    value, lo, hi = ratio_interval(num, den, n_boot=4000)
    assert value == 3.0 and 1.0 < lo < 3.0 < hi < 6.0
    # equal denominators: z = num − mean, sd = std(num, ddof=1); n = (1.96 sd / effect)^2
    sd = float(np.std(num, ddof=1))
    assert docs_to_resolve(num, den, 0.5) == pytest.approx((1.959963984540054 * sd / 0.5) ** 2)


def test_document_sums_of_several_values():
    tokens = torch.tensor([1, 5, 1, 7, 8])
    pos = torch.arange(1, 5)
    a, b = document_sums(pos, tokens, 1, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4))
    assert a.tolist() == [1.0, 2 + 3 + 4] and b.tolist() == [1.0, 3.0]


def test_eval_against_prints_every_signal_with_its_interval(tmp_path, tiny_dataset, capsys):
    from types import SimpleNamespace

    from qlab.cli import main
    from qlab.io.checkpoint import save_checkpoint
    from qlab.train.config import TrainConfig

    torch.manual_seed(0)
    runs = []
    for name, noise in (("ref", 0.0), ("other", 0.3)):
        m = GPT(model_config(512, loop=False))
        if noise:
            m.load_state_dict(runs[0][1].state_dict())
            with torch.no_grad():
                for p in m.parameters():
                    if p.dim() == 2:
                        p.add_(noise * torch.randn_like(p))
        opt, step = SimpleNamespace(state_dict=dict), {"step": 0, "tokens_seen": 0}
        save_checkpoint(tmp_path / name, m, None, opt, step, m.config, TrainConfig())
        runs.append((name, m))
    argv = ["eval", str(tmp_path / "other"), "--data", str(tiny_dataset.root), "--max-tokens", "1025"]
    assert main([*argv, "--against", str(tmp_path / "ref"), "--boot", "100", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for label in ("KL:", "top-1:", "Δbpb:", "noise:", "mbit/byte", "documents"):
        assert label in out
    assert main([*argv, "--against", str(tmp_path / "other"), "--boot", "100", "--no-progress"]) == 0
    assert "KL:        0.000  [0.000, 0.000] mbit/byte" in capsys.readouterr().out


def test_the_marginal_table_and_the_allocator_carry_the_kl_signal(tiny_dataset):
    from qlab.analysis import marginal as M
    from qlab.analysis.allocator import choose_settings
    from qlab.data import build_byte_tables, load_tokenizer, load_validation_tokens
    from qlab.quant.policy import record_policy

    torch.manual_seed(0)
    model = GPT(model_config(512, loop=False))
    val = load_validation_tokens(tiny_dataset.val_files, 32)[:1025]
    tables = build_byte_tables(load_tokenizer(tiny_dataset.tokenizer_path))
    policy = record_policy("record_small")
    table = M.marginal_table(model, policy, val, tables, {}, seq_len=32, settings=["bits-1"], n_boot=200)
    assert ((table["kl_lo"] <= table["delta_kl"]) & (table["delta_kl"] <= table["kl_hi"])).all()
    assert (table["delta_kl"] > 0).all()  # a bit less: further from the float model
    assert (table["kl_resolved"] == ((table["kl_lo"] > 0) | (table["kl_hi"] < 0))).all()
    choice, total, nbytes = choose_settings(table, -1, value="delta_kl")
    assert choice and nbytes <= -1 and total == pytest.approx(sum(
        float(table[(table.group == g) & (table.setting == s)]["delta_kl"].iloc[0]) for g, s in choice.items()
    ))  # fmt: skip
