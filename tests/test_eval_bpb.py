"""bpb evaluation: window layouts, hand-computed bpb, and the distributed path."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qlab.data.tokenizer import ByteTables
from qlab.errors import DataError
from qlab.eval.bpb import evaluate_bpb, sliding_windows, standard_windows, truncate_tokens


class BigramTable(torch.nn.Module):
    """A model whose log-probabilities are a fixed table indexed by the previous token."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, idx, targets=None, reduction="mean"):
        logp = torch.log_softmax(self.logits[idx], dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return nll if reduction == "none" else nll.mean()


def toy_tables(vocab: int) -> ByteTables:
    # token 0 is a boundary (BOS-like, 0 bytes); others 1..3 bytes, odd ids carry a leading space
    base = torch.tensor([0] + [1 + i % 3 for i in range(1, vocab)], dtype=torch.int32)
    space = torch.tensor([False] + [i % 2 == 1 for i in range(1, vocab)])
    boundary = torch.tensor([True] + [False] * (vocab - 1))
    return ByteTables(base_bytes=base, has_leading_space=space, is_boundary=boundary)


def hand_bpb(model: BigramTable, tokens: torch.Tensor, tables: ByteTables) -> tuple[float, float]:
    """Direct per-token loop: Σ NLL / ln 2 / Σ bytes over every target once (full context irrelevant)."""
    nll_sum, byte_sum = 0.0, 0
    logp = torch.log_softmax(model.logits.detach().double(), dim=-1)
    for j in range(1, tokens.numel()):
        x, y = int(tokens[j - 1]), int(tokens[j])
        nll_sum += -float(logp[x, y])
        byte_sum += int(tables.base_bytes[y]) + int(
            bool(tables.has_leading_space[y]) and not bool(tables.is_boundary[x])
        )
    return nll_sum / (tokens.numel() - 1), nll_sum / math.log(2) / byte_sum


def test_standard_windows_partition_targets():
    windows = standard_windows(num_tokens=4 * 16 + 1, seq_len=16)
    scored = [t for w in windows for t in range(w.score_from, w.end + 1)]
    assert scored == list(range(1, 65))


@pytest.mark.parametrize("n,seq,stride", [(101, 16, 4), (65, 16, 16), (200, 32, 7), (17, 16, 5), (5, 16, 3)])
def test_sliding_windows_score_every_token_exactly_once(n, seq, stride):
    windows = sliding_windows(n, seq, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end + 1)]
    assert scored == list(range(1, n))
    for w in windows:
        assert w.end - w.start <= seq
        assert w.start < w.score_from  # the target's own input is inside the window
    for w in windows[1:]:
        if w.end - w.start == seq:  # full windows give at least seq - stride tokens of context
            assert w.score_from - 1 - w.start >= seq - stride


def test_bpb_matches_hand_computation():
    torch.manual_seed(0)
    vocab = 12
    tokens = torch.randint(0, vocab, (16 * 5 + 1,))
    tokens[0] = 0
    tables = toy_tables(vocab)
    model = BigramTable(vocab)
    loss, bpb = hand_bpb(model, tokens, tables)
    res = evaluate_bpb(model, tokens, tables, seq_len=16, batch_seqs=3)
    assert res.tokens == 80
    assert res.val_loss == pytest.approx(loss, rel=1e-6)
    assert res.val_bpb == pytest.approx(bpb, rel=1e-6)
    # a context-free model gives the same score with any window layout
    slide = evaluate_bpb(model, tokens, tables, seq_len=16, stride=5, batch_seqs=4)
    assert slide.tokens == 80 and slide.val_bpb == pytest.approx(bpb, rel=1e-6)


def test_uniform_model_bpb_is_log_vocab_over_bytes_per_token():
    vocab = 8
    model = BigramTable(vocab)
    with torch.no_grad():
        model.logits.zero_()
    tokens = torch.arange(33) % vocab
    tables = toy_tables(vocab)
    res = evaluate_bpb(model, tokens, tables, seq_len=8)
    assert res.val_loss == pytest.approx(math.log(vocab))
    assert res.val_bpb == pytest.approx(res.tokens * math.log2(vocab) / res.bytes)


def test_truncation_and_too_short():
    t = torch.arange(50)
    assert truncate_tokens(t, 16, None).numel() == 49
    assert truncate_tokens(t, 16, 40).numel() == 33
    with pytest.raises(DataError, match="fewer than one window"):
        truncate_tokens(torch.arange(10), 16, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tokens, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = evaluate_bpb(BigramTable(12), tokens, toy_tables(12), seq_len=8, stride=3, batch_seqs=2)
        out[rank] = (res.val_loss, res.val_bpb, res.tokens, res.bytes)
    finally:
        dist.destroy_process_group()


def test_distributed_eval_equals_single_process():
    tokens = torch.randint(0, 12, (97,), generator=torch.Generator().manual_seed(1))
    single = evaluate_bpb(BigramTable(12), tokens, toy_tables(12), seq_len=8, stride=3)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), tokens, out), nprocs=2, join=True)
    for rank in range(2):
        loss, bpb, n, nbytes = out[rank]
        assert n == single.tokens and nbytes == single.bytes
        assert loss == pytest.approx(single.val_loss, rel=1e-9)
        assert bpb == pytest.approx(single.val_bpb, rel=1e-9)


def test_unigram_bpb_by_hand():
    from qlab.eval.baselines import uniform_bpb, unigram_bpb

    tables = toy_tables(4)
    train = torch.tensor([1, 1, 2, 3])  # counts+1: [1, 3, 2, 2] / 8
    val = torch.tensor([0, 1, 2])
    # base bytes [0, 2, 3, 1]: target 1 after boundary 0 is 2 bytes (its space flag is
    # suppressed), target 2 is 3 bytes (no space flag): 5 bytes in all
    expected_bits = -math.log2(3 / 8) - math.log2(2 / 8)
    assert unigram_bpb(train, val, tables, 4) == pytest.approx(expected_bits / 5)
    assert uniform_bpb(val, tables, 4) == pytest.approx(2 * 2 / 5)


def test_a_too_small_token_cap_is_named_as_the_cap():
    from qlab.errors import DataError
    from qlab.eval.bpb import truncate_tokens

    with pytest.raises(DataError, match="max_tokens=64 is less than one window of 256"):
        truncate_tokens(torch.zeros(10_000, dtype=torch.int64), 256, 64)
    with pytest.raises(DataError, match="validation set has 100 tokens"):
        truncate_tokens(torch.zeros(100, dtype=torch.int64), 256, None)
