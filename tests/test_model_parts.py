"""Attention building blocks tested directly: RoPE, XSA, sliding-window mask, BigramHash ids."""

from __future__ import annotations

import math

import torch

from qlab.config import get_preset
from qlab.model import GPT, apply_rope, bigram_bucket_ids, rope_tables, sliding_window_mask, xsa


def test_rope_tables_by_hand():
    cos, sin = rope_tables(3, 4, 100.0)
    # frequencies 100^0 = 1 and 100^(-2/4) = 0.1
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, 0.2]])
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())


def test_partial_rope_leaves_other_dims_and_norms():
    x = torch.randn(2, 3, 10, 64)
    cos, sin = rope_tables(10, 16, 1e4)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[..., 16:], x[..., 16:], rtol=0, atol=0)
    assert not torch.allclose(y[..., 1:, :16], x[..., 1:, :16])
    # each rotated pair (i, i + 8) keeps its length
    pair_x = x[..., :8] ** 2 + x[..., 8:16] ** 2
    pair_y = y[..., :8] ** 2 + y[..., 8:16] ** 2
    torch.testing.assert_close(pair_y, pair_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0 is not rotated


def test_full_rope_is_relative():
    # <rope(q, m), rope(k, n)> depends only on m − n
    q, k = torch.randn(32), torch.randn(32)
    cos, sin = rope_tables(12, 32, 1e4)
    qs = apply_rope(q.expand(12, 32), cos, sin)
    ks = apply_rope(k.expand(12, 32), cos, sin)
    torch.testing.assert_close(qs[5] @ ks[2], qs[9] @ ks[6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(qs[3] @ ks[3], q @ k, rtol=1e-4, atol=1e-4)


def test_rope_ntk_stretches_base_only_beyond_train_len():
    cos_a, _ = rope_tables(8, 16, 1e4, train_seq_len=8)
    cos_b, _ = rope_tables(8, 16, 1e4)
    torch.testing.assert_close(cos_a, cos_b)
    cos_long, _ = rope_tables(16, 16, 1e4, train_seq_len=8)
    cos_want, _ = rope_tables(16, 16, 1e4 * 2 ** (16 / 14))
    torch.testing.assert_close(cos_long, cos_want)


def test_xsa_output_orthogonal_to_each_heads_value():
    y = torch.randn(2, 8, 5, 16)
    v = torch.randn(2, 4, 5, 16)
    out = xsa(y, v)
    for h in range(8):
        vhat = v[:, h // 2] / v[:, h // 2].norm(dim=-1, keepdim=True)
        assert (out[:, h] * vhat).sum(-1).abs().max() < 1e-5
        # the removed part is exactly the component along vhat
        removed = y[:, h] - out[:, h]
        torch.testing.assert_close(removed, (y[:, h] * vhat).sum(-1, keepdim=True) * vhat)
    torch.testing.assert_close(xsa(out, v), out, atol=1e-5, rtol=1e-5)  # idempotent


def test_model_attention_output_orthogonal_to_v():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    attn = model.blocks[1].attn
    seen = {}
    attn.c_v.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o.detach()))
    attn.proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("y", i[0].detach()))
    model(torch.randint(0, 1024, (2, 12)))
    cfg = model.config
    y = seen["y"].view(2, 12, cfg.num_heads, cfg.head_dim)
    v = seen["v"].view(2, 12, cfg.num_kv_heads, cfg.head_dim)
    group = cfg.num_heads // cfg.num_kv_heads
    for h in range(cfg.num_heads):
        vhat = v[:, :, h // group] / v[:, :, h // group].norm(dim=-1, keepdim=True)
        assert (y[:, :, h] * vhat).sum(-1).abs().max() < 1e-4
        assert y[:, :, h].abs().max() > 1e-3


def test_sliding_window_mask_by_hand():
    m = sliding_window_mask(5, 2)
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, want)
    assert torch.equal(sliding_window_mask(4, 10), torch.ones(4, 4, dtype=torch.bool).tril())


def test_bigram_bucket_ids():
    idx = torch.tensor([[5, 7, 7, 1000]])
    ids = bigram_bucket_ids(idx, 101)
    want = [100] + [((36313 * c) ^ (27191 * p)) % 100 for p, c in [(5, 7), (7, 7), (7, 1000)]]
    assert ids.tolist() == [want]
    big = bigram_bucket_ids(torch.randint(0, 8192, (4, 512)), 4096)
    assert int(big[:, 1:].max()) <= 4094 and int(big.min()) >= 0
    assert big[:, 1:].unique().numel() > 1000  # spread over many buckets
    assert math.isclose(float((big[:, 0] == 4095).float().mean()), 1.0)
