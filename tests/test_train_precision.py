"""--precision record: bf16 where the record ran bf16, and nowhere else."""

from __future__ import annotations

import math

import torch
from trainkit import model_config, train_config

from qlab.model.attention import rope_tables
from qlab.model.gpt import GPT
from qlab.train.muon import muon_update
from qlab.train.trainer import train


def test_rope_tables_in_record_bf16_match_the_hand_computation():
    cos, sin = rope_tables(2048, 16, 10000.0, train_seq_len=2048, record_bf16=True)
    assert cos.dtype == torch.bfloat16
    pos = torch.arange(2048, dtype=torch.bfloat16)
    assert len(torch.unique(pos)) == 641  # bf16 has 8 significant bits
    inv = (1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)).to(torch.bfloat16)
    assert torch.equal(cos, torch.outer(pos, inv).cos())
    fp_cos, _ = rope_tables(2048, 16, 10000.0, train_seq_len=2048)
    assert float((fp_cos - cos.float()).abs().max()) > 0.5  # far positions collapse in bf16
    long_cos, _ = rope_tables(4096, 16, 10000.0, train_seq_len=2048, record_bf16=True)
    assert long_cos.dtype == torch.float32  # the NTK path is fp32 in the record too


def test_record_precision_model_and_muon_update():
    cfg = model_config(64).replace(precision="record")
    model = GPT(cfg)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}
    g = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    upd = muon_update(g, torch.zeros_like(g), 0.9, True, True, 5, record_bf16=True)
    assert upd.dtype == torch.float32 and torch.equal(upd, upd.to(torch.bfloat16).float())
    ref = muon_update(g, torch.zeros_like(g), 0.9, True, True, 5)
    assert not torch.equal(ref, ref.to(torch.bfloat16).float())


def test_record_precision_trains(tiny_dataset, tmp_path):
    m = model_config(tiny_dataset.vocab_size).replace(precision="record")
    result = train(train_config(tiny_dataset, tmp_path / "r", iterations=3), m, progress=False)
    assert math.isfinite(result.val_bpb)
