"""Score-first TTT: legality, chunk accounting, lr = 0 equivalence, learning; PreQuantTTT."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlab.config import ModelConfig
from qlab.data.tokenizer import ByteTables
from qlab.errors import ConfigError, QlabError
from qlab.eval.bpb import evaluate_bpb
from qlab.eval.ttt import (
    TTTConfig,
    check_legality,
    chunk_lr,
    chunk_train_sequences,
    prequant_ttt,
    score_first_ttt,
    snr_scale_grads,
)
from qlab.model.gpt import GPT

V = 64
LOG: list[tuple[bool, set[int]]] = []  # (grad enabled, target positions) per forward; survives deepcopy


def _tables(vocab: int, seed: int = 0) -> ByteTables:
    g = torch.Generator().manual_seed(seed)
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[:3] = True
    base = torch.randint(1, 4, (vocab,), generator=g, dtype=torch.int32).masked_fill(boundary, 0)
    space = torch.rand(vocab, generator=g) < 0.3
    return ByteTables(base, space & ~boundary, boundary)


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
        rope_dims=None, loop_layers=None, train_seq_len=32, eval_seq_len=32,
    )  # fmt: skip
    return GPT(cfg)


class PositionLogger(nn.Module):
    """Bigram stand-in whose token ids equal their positions, logging every forward."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.table(idx).float()
        if targets is None:
            return logits
        LOG.append((torch.is_grad_enabled(), set(targets.flatten().tolist())))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss if reduction == "mean" else loss.view(targets.shape)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- legality ----------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [None, 8])
def test_no_token_scored_after_training_on_it(stride):
    n = 1 + 32 * 12  # token id == position
    tokens = torch.arange(n)
    LOG.clear()
    cfg = TTTConfig(
        seq_len=32, chunk_tokens=96, stride=stride, score_batch_seqs=3, batch_seqs=2, epochs=2, lr=0.1
    )
    res = score_first_ttt(PositionLogger(n), tokens, _tables(n), cfg)
    scored_max, trained, n_train = 0, set(), 0
    for grad, targets in LOG:
        if grad:  # training forward: only already-scored targets
            assert max(targets) <= scored_max
            trained |= targets
            n_train += 1
        else:  # scoring forward: targets scored for the first time were never trained on
            fresh = {t for t in targets if t > scored_max}
            assert not fresh & trained
            scored_max = max(scored_max, max(targets))
    assert n_train == res.per_chunk["train_steps"].sum() > 0
    assert scored_max == n - 1
    check_legality(res.ledger)
    # ledger: model versions at scoring time grow by the steps taken in between
    scores = res.ledger[res.ledger.event == "score"]
    assert list(scores.version) == list(res.per_chunk.version)
    assert list(res.per_chunk.version) == [0, *res.per_chunk.train_steps.cumsum()[:-1]]


def test_check_legality_rejects_forged_ledgers():
    cols = ["event", "chunk", "first_target", "last_target", "version"]
    ok = pd.DataFrame([["score", 0, 1, 10, 0], ["train", 0, 1, 10, 0], ["score", 1, 11, 20, 3]], columns=cols)
    check_legality(ok)
    rescored = pd.DataFrame(
        [["score", 0, 1, 10, 0], ["train", 0, 1, 10, 0], ["score", 1, 10, 20, 3]], columns=cols
    )
    with pytest.raises(QlabError, match="already trained"):
        check_legality(rescored)
    ahead = pd.DataFrame([["score", 0, 1, 10, 0], ["train", 0, 1, 12, 0]], columns=cols)
    with pytest.raises(QlabError, match="only targets up to 10"):
        check_legality(ahead)


# ---- accounting and equivalence ------------------------------------------------------------


@pytest.mark.parametrize("stride", [None, 8])
def test_lr_zero_equals_plain_evaluation_and_chunks_partition_targets(stride):
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (32 * 12 + 5,))
    tables = _tables(V, 1)
    model = _gpt()
    with torch.no_grad():  # give the zero-initialised projections some weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = _state(model)
    cfg = TTTConfig(
        seq_len=32, chunk_tokens=64, stride=stride, lr=0.0, batch_seqs=2, epochs=1, score_batch_seqs=2
    )
    res = score_first_ttt(model, tokens, tables, cfg)
    plain = evaluate_bpb(model, tokens, tables, seq_len=32, stride=stride, batch_seqs=4)
    assert res.tokens == plain.tokens and res.bytes == plain.bytes
    assert res.val_bpb == pytest.approx(plain.val_bpb, rel=1e-6)
    assert res.val_loss == pytest.approx(plain.val_loss, rel=1e-6)
    pc = res.per_chunk
    assert pc.tokens.sum() == plain.tokens and pc.bytes.sum() == plain.bytes
    # chunks tile the targets 1 … last exactly once, in order
    assert pc.first_target.iloc[0] == 1
    assert list(pc.first_target.iloc[1:]) == list(pc.last_target.iloc[:-1] + 1)
    assert (pc.last_target - pc.first_target + 1).sum() == plain.tokens
    assert pc.running_bpb.iloc[-1] == pytest.approx(res.val_bpb)
    assert len(pc) >= plain.tokens // 64 and pc.train_steps.iloc[-1] == 0  # last chunk not trained
    for k, v in _state(model).items():
        assert torch.equal(v, before[k]), k  # the caller's model is untouched


def test_positive_lr_learns_a_repetitive_sequence_and_leaves_caller_alone():
    torch.manual_seed(2)
    pattern = torch.randint(3, V, (24,))
    tokens = pattern.repeat(60)[: 32 * 40 + 1]
    tables = _tables(V, 2)
    model = _gpt(2)
    before = _state(model)
    plain = evaluate_bpb(model, tokens, tables, seq_len=32)
    cfg = TTTConfig(seq_len=32, chunk_tokens=256, optimizer="adamw", lr=1e-2, epochs=2, batch_seqs=4)
    res = score_first_ttt(model, tokens, tables, cfg, return_model=True)
    assert res.val_bpb < 0.8 * plain.val_bpb
    pc = res.per_chunk
    assert pc.chunk_bpb.iloc[0] == pytest.approx(
        evaluate_bpb(model, tokens[: 256 + 1], tables, seq_len=32).val_bpb, rel=1e-6
    )  # first chunk scored by the untouched model
    assert pc.chunk_bpb.iloc[-1] < 0.5 * pc.chunk_bpb.iloc[0]
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert res.model is not None and res.model is not model


def test_freeze_blocks_and_snr_scaling_run():
    tokens = torch.randint(0, V, (32 * 8 + 1,), generator=torch.Generator().manual_seed(3))
    model = _gpt(3)
    cfg = TTTConfig(seq_len=32, chunk_tokens=64, lr=0.05, epochs=1, freeze_blocks=1, grad_scaling="snr2")
    res = score_first_ttt(model, tokens, _tables(V), cfg, return_model=True)
    adapted = res.model.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("blocks.0."):
            assert torch.equal(adapted[k], v), k
    assert any(
        not torch.equal(adapted[k], v) for k, v in model.state_dict().items() if k.startswith("blocks.1.")
    )
    with pytest.raises(ConfigError, match="freeze_blocks=3"):
        score_first_ttt(model, tokens, _tables(V), TTTConfig(seq_len=32, chunk_tokens=64, freeze_blocks=3))


# ---- pieces by hand --------------------------------------------------------------------------


def test_chunk_train_sequences_by_hand():
    t = torch.arange(100)
    x, y, first = chunk_train_sequences(t, 10, 28, 8)  # rows start at targets 10, 18, and 21 (shifted)
    assert first == 10
    assert [int(r[0]) for r in y] == [10, 18, 21] and int(y[-1, -1]) == 28
    assert torch.equal(x, y - 1)
    x, y, first = chunk_train_sequences(t, 1, 5, 8)  # shorter than seq_len: one row of 5 targets
    assert first == 1 and y.tolist() == [[1, 2, 3, 4, 5]]
    x, y, first = chunk_train_sequences(t, 40, 43, 8)  # short chunk: extends back into scored targets
    assert first == 36 and y.tolist() == [list(range(36, 44))]


def test_cosine_lr_over_chunks():
    cfg = TTTConfig(lr=0.01)
    assert [chunk_lr(cfg, c, 3) for c in range(3)] == pytest.approx([0.01, 0.005, 0.0])
    assert chunk_lr(TTTConfig(lr=0.01, cosine=False), 2, 3) == 0.01
    assert chunk_lr(cfg, 0, 1) == 0.01


def test_snr_scaling_by_hand():
    params = [nn.Parameter(torch.zeros(n)) for n in (2, 2, 3, 1)]
    grads = [[1.0, 3.0], [1.0, -1.0], [2.0, 4.0, 6.0], [5.0]]  # SNR √2, 0, 2; scalar untouched
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    scales = snr_scale_grads(params, power=2)
    assert scales == pytest.approx([0.5, 0.0, 1.0, 1.0])
    torch.testing.assert_close(params[0].grad, torch.tensor([0.5, 1.5]))
    assert params[1].grad.abs().sum() == 0 and params[3].grad.item() == 5.0
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    assert snr_scale_grads(params, power=1) == pytest.approx([2**-0.5, 0.0, 1.0, 1.0])


def test_config_validation():
    for bad in [{"chunk_tokens": 0}, {"optimizer": "lion"}, {"lr": -1.0}, {"grad_scaling": "snr3"},
                {"momentum": 1.0}, {"stride": 0}, {"autocast": "fp8"}]:  # fmt: skip
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TTTConfig(**bad)


# ---- PreQuantTTT -------------------------------------------------------------------------------


def test_prequant_ttt_adapts_a_copy():
    torch.manual_seed(4)
    tokens = torch.randint(3, V, (16,)).repeat(40)[: 32 * 16 + 1]
    tables = _tables(V, 4)
    model = _gpt(4)
    before = _state(model)
    adapted = prequant_ttt(
        model, tokens, TTTConfig(seq_len=32, optimizer="adamw", lr=1e-2, epochs=2, batch_seqs=4)
    )
    assert adapted is not model and not adapted.training
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    new = evaluate_bpb(adapted, tokens, tables, seq_len=32).val_bpb
    old = evaluate_bpb(model, tokens, tables, seq_len=32).val_bpb
    assert new < 0.7 * old
