"""The reference GPT: exact parameter counts, shapes, causality, looping, heads, groups, grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qlab.config import get_preset
from qlab.errors import ConfigError, DataError
from qlab.model import GPT, parameter_table


def meta_model(name: str, **changes) -> GPT:
    with torch.device("meta"):
        return GPT(get_preset(name).replace(**changes))


def small(**changes) -> GPT:
    """A fast model with every record feature (tiny preset, narrower)."""
    torch.manual_seed(0)
    return GPT(get_preset("tiny").replace(model_dim=64, num_heads=4, num_kv_heads=2, **changes))


def randomize(model: GPT, seed: int = 0) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 2 and min(p.shape) > 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.add_(0.3 * noise)
    return model


def hand_count(vocab, layers, d, heads, kv_heads, mlp, n_skip, gates):
    """Parameter count from the per-block list in PAPERS.md §1 (tied embeddings)."""
    kv = kv_heads * (d // heads)
    block = d * d + 2 * d * kv + d * d + heads + 2 * mlp * d + d + d + 2 * d
    return vocab * d + layers * block + n_skip * d * (2 if gates else 1)


def test_baseline_count_exact():
    m = meta_model("baseline")
    assert m.num_parameters() == 17_059_912 == hand_count(1024, 9, 512, 8, 4, 1024, 4, False)
    assert tuple(m.skip_weights.shape) == (4, 512) and m.skip_gates is None


def test_record_count_exact():
    m = meta_model("record")
    assert m.num_parameters() == 35_943_512 == hand_count(8192, 11, 512, 8, 4, 2048, 7, True)
    assert tuple(m.skip_weights.shape) == (7, 512) == tuple(m.skip_gates.shape)


def test_tiny_count_and_names():
    m = meta_model("tiny")
    assert m.num_parameters() == hand_count(1024, 4, 128, 4, 2, 384, 4, True)
    per_block = [
        "attn.c_q.weight",
        "attn.c_k.weight",
        "attn.c_v.weight",
        "attn.proj.weight",
        "attn.q_gain",
        "mlp.fc.weight",
        "mlp.proj.weight",
        "attn_scale",
        "mlp_scale",
        "resid_mix",
    ]
    want = {"tok_emb.weight", "skip_weights", "skip_gates"}
    want |= {f"blocks.{i}.{n}" for i in range(4) for n in per_block}
    assert {n for n, _ in m.named_parameters()} == want


def test_switches_change_counts_by_expected_amounts():
    base = meta_model("record").num_parameters()
    assert (
        meta_model("record", bigram_buckets=4096, bigram_dim=128).num_parameters()
        == base + 4096 * 128 + 512 * 128
    )
    assert meta_model("record", value_embed_layers=(0, 9)).num_parameters() == base + 2 * 8192 * 256
    untied = meta_model("record", tie_embeddings=False)
    assert untied.num_parameters() == base + 8192 * 512 and tuple(untied.lm_head.weight.shape) == (8192, 512)
    assert meta_model("record", attn_window=128).num_parameters() == base
    names = {
        n for n, _ in meta_model("record", bigram_buckets=64, value_embed_layers=(3,)).named_parameters()
    }
    assert {"bigram.embed.weight", "bigram.proj.weight", "value_embeds.3.weight"} <= names


def test_forward_shapes_and_losses():
    m = randomize(small())
    idx = torch.randint(0, 1024, (3, 17))
    tgt = torch.randint(0, 1024, (3, 17))
    logits = m(idx)
    assert logits.shape == (3, 17, 1024) and logits.dtype == torch.float32
    loss = m(idx, tgt)
    per_tok = m(idx, tgt, reduction="none")
    assert loss.dim() == 0 and per_tok.shape == (3, 17) and per_tok.dtype == torch.float32
    torch.testing.assert_close(per_tok.mean(), loss)
    want = -torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
    torch.testing.assert_close(per_tok, want, rtol=1e-5, atol=1e-5)
    assert m.final_hidden(idx).shape == (3, 17, 64)


def test_untrained_loss_near_uniform():
    m = small()
    loss = m(torch.randint(0, 1024, (2, 32)), torch.randint(0, 1024, (2, 32)))
    assert abs(loss.item() - math.log(1024)) < 0.05


def test_bad_inputs_raise():
    m = small()
    with pytest.raises(DataError, match="shape"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="integer"):
        m(torch.zeros(1, 4))
    with pytest.raises(DataError, match="range"):
        m(torch.full((1, 4), 1024))
    with pytest.raises(DataError, match="targets"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="reduction"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), reduction="sum")
    with pytest.raises(ConfigError):
        GPT({"vocab_size": 4})


@pytest.mark.parametrize("looping", [False, True])
def test_causality(looping):
    m = randomize(small(bigram_buckets=64, value_embed_layers=(1,)))
    m.set_looping(looping)
    idx = torch.randint(0, 1024, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % 1024
    with torch.no_grad():
        a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().amax(-1).min() > 1e-4  # every later position sees it


def test_window_limits_receptive_field():
    # one layer, window 4: token s reaches exactly positions s .. s + 3
    m = randomize(small(num_layers=1, loop_layers=None, attn_window=4))
    idx = torch.randint(0, 1024, (1, 16))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 1024
    with torch.no_grad():
        diff = (m(idx) - m(changed)).abs().amax(-1)[0]
    assert torch.all(diff[:6] == 0) and torch.all(diff[10:] == 0)
    assert torch.all(diff[6:10] > 1e-4)


def test_window_larger_than_sequence_equals_full_attention():
    full = randomize(small())
    windowed = small(attn_window=64)
    windowed.load_state_dict(full.state_dict())
    idx = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(windowed(idx), full(idx), rtol=1e-5, atol=1e-5)


def test_layer_orders_and_skips():
    rec = meta_model("record")
    assert rec.layer_order() == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]) and rec.num_skips == 5
    assert not rec.looping
    rec.set_looping(True)
    assert rec.looping
    assert rec.layer_order() == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10]) and rec.num_skips == 7
    base = meta_model("baseline")
    assert base.layer_order() == ([0, 1, 2, 3], [4, 5, 6, 7, 8]) and base.num_skips == 4
    with pytest.raises(ConfigError, match="loop_layers"):
        base.set_looping(True)
    base.set_looping(False)


def test_block_outputs_follow_executed_layers():
    m = randomize(small())
    idx = torch.randint(0, 1024, (2, 10))
    for looping, n in ((False, 4), (True, 8)):
        m.set_looping(looping)
        with torch.no_grad():
            outs = m.block_outputs(idx)
            logits = m(idx)
            hidden = m.final_hidden(idx)
        assert len(outs) == n and all(o.shape == (2, 10, 64) for o in outs)
        torch.testing.assert_close(m.norm_and_logits(outs[-1]), logits)
        torch.testing.assert_close(m.logits_from_hidden(hidden), logits)
        torch.testing.assert_close(hidden.pow(2).mean(-1), torch.ones(2, 10), rtol=1e-4, atol=1e-4)
    m.set_looping(False)
    with torch.no_grad():
        off = m(idx)
    m.set_looping(True)
    with torch.no_grad():
        assert not torch.allclose(m(idx), off)


def test_softcap_bounds_logits():
    m = small()
    with torch.no_grad():
        m.tok_emb.weight.normal_(0, 50.0)
        logits = m(torch.randint(0, 1024, (2, 8)))
    assert logits.abs().max() <= 30.0
    assert logits.abs().max() > 29.0  # the cap is actually reached


def test_tied_head_is_the_embedding():
    m = randomize(small())
    assert m.lm_head is None
    h = torch.randn(2, 5, 64)
    torch.testing.assert_close(m.logits_from_hidden(h), 30 * torch.tanh(h @ m.tok_emb.weight.T / 30))
    with torch.no_grad():
        m.tok_emb.weight[7] += 1.0
    torch.testing.assert_close(m.logits_from_hidden(h)[..., 7], 30 * torch.tanh(h @ m.tok_emb.weight[7] / 30))
    untied = small(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert torch.all(untied.lm_head.weight == 0)


def test_param_groups_partition_exactly():
    m = small(bigram_buckets=64, value_embed_layers=(0,), tie_embeddings=False)
    groups = m.param_groups()
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters()) and len(names) == len(set(names))
    assert sum(p.numel() for g in groups.values() for _, p in g) == m.num_parameters()
    embed = {n for n, _ in groups["embed"]}
    assert embed == {"tok_emb.weight", "bigram.embed.weight", "value_embeds.0.weight", "lm_head.weight"}
    matrix = {n for n, _ in groups["matrix"]}
    assert "blocks.0.attn.c_q.weight" in matrix and "blocks.3.mlp.proj.weight" in matrix
    assert "bigram.proj.weight" in matrix and all(p.dim() == 2 for _, p in groups["matrix"])
    scalar = {n for n, _ in groups["scalar"]}
    assert {"skip_weights", "skip_gates", "blocks.2.resid_mix", "blocks.1.attn.q_gain"} <= scalar
    table = parameter_table(m)
    assert set(table["family"]) == {"embedding", "attention", "mlp", "control"}
    assert table.set_index("name").loc["blocks.0.attn.q_gain", "family"] == "attention"


def test_gradients_reach_every_parameter():
    m = randomize(small(bigram_buckets=64, value_embed_layers=(2,)))
    m.set_looping(True)
    idx = torch.randint(0, 1024, (2, 16))
    m(idx, torch.roll(idx, -1, 1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    # with looping off the looped-only skip rows get no gradient
    m.zero_grad()
    m.set_looping(False)
    m(idx, torch.roll(idx, -1, 1)).backward()
    assert (
        torch.all(m.skip_gates.grad[m.num_skips :] == 0) and m.skip_gates.grad[: m.num_skips].abs().max() > 0
    )


def test_init_is_deterministic_and_as_specified():
    torch.manual_seed(3)
    a = GPT(get_preset("tiny"))
    torch.manual_seed(3)
    b = GPT(get_preset("tiny"))
    torch.manual_seed(4)
    c = GPT(get_preset("tiny"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    assert abs(a.tok_emb.weight.std().item() - 0.005) < 0.0003
    blk = a.blocks[2]
    assert torch.all(blk.attn.proj.weight == 0) and torch.all(blk.mlp.proj.weight == 0)
    w = blk.attn.c_k.weight  # 64 x 128: orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(64), atol=1e-4, rtol=0)
    assert (
        torch.all(blk.attn.q_gain == 4.0) and torch.all(a.skip_gates == 0) and torch.all(a.skip_weights == 1)
    )
    assert torch.equal(blk.resid_mix, torch.stack((torch.ones(128), torch.zeros(128))))
    assert [b.ln_scale for b in a.blocks] == [1 / math.sqrt(i + 1) for i in range(4)]
    plain = GPT(get_preset("tiny").replace(orthogonal_init=False, ln_scale=False, q_gain_init=1.5))
    w = plain.blocks[0].attn.c_k.weight
    assert not torch.allclose(w @ w.T, torch.eye(64), atol=1e-2)
    assert torch.all(plain.blocks[0].attn.q_gain == 1.5) and plain.blocks[0].ln_scale == 1.0


def test_bf16_autocast_forward_backward():
    m = randomize(small())
    idx = torch.randint(0, 1024, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(idx)
        loss = m(idx, idx)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    loss.backward()
    assert torch.isfinite(m.blocks[0].attn.c_q.weight.grad).all()
    with torch.no_grad():
        ref = m(idx)
    assert F.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.99
