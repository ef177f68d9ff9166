"""qlab's record stack against PR #1394's own code (skipped without QLAB_RECORD_DIR)."""

from __future__ import annotations

import numpy as np
import torch

from qlab.config import ModelConfig
from qlab.data.record_loader import RecordSequenceLoader
from qlab.eval.bpb import evaluate_bpb
from qlab.model.gpt import GPT
from qlab.quant.gptq import gptq_quantize
from qlab.quant.policy import get_policy
from qlab.train.config import TrainConfig
from qlab.train.optim import build_optimizers

SMALL = dict(vocab_size=512, num_layers=6, model_dim=64, embedding_dim=64, num_heads=4, num_kv_heads=2,
             mlp_mult=4.0, xsa_last_n=6, loop_start=2, loop_end=3, num_loops=2, rope_dims=8,
             train_seq_len=64, eval_seq_len=64)  # fmt: skip


def _hparams(record, **over):
    h = record.Hyperparameters()
    for k, v in {**SMALL, **over}.items():
        setattr(h, k, v)
    return h


def _qlab_config(h) -> ModelConfig:
    return ModelConfig(
        vocab_size=h.vocab_size,
        num_layers=h.num_layers,
        model_dim=h.model_dim,
        num_heads=h.num_heads,
        num_kv_heads=h.num_kv_heads,
        mlp_mult=h.mlp_mult,
        rope_dims=h.rope_dims,
        loop_layers=tuple(range(h.loop_start, h.loop_end + 1)),
        loop_repeats=h.num_loops + 1,
        xsa_last_n=None if h.xsa_last_n >= h.num_layers else h.xsa_last_n,
        train_seq_len=h.train_seq_len,
        eval_seq_len=h.eval_seq_len,
    )


def _pair(record, seed=0):
    h = _hparams(record)
    torch.manual_seed(seed)
    ours = GPT(_qlab_config(h))
    with torch.no_grad():  # move every weight off its initial value (zero-init projections)
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = record.GPT(h)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return h, ours, theirs


def test_forward_is_bit_identical(record):
    _, ours, theirs = _pair(record)
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    for looping in (False, True):
        ours.set_looping(looping)
        theirs.looping_active = looping
        with torch.no_grad():
            a = ours.logits_from_hidden(ours.final_hidden(x))
            b = theirs.forward_logits(x)
        assert torch.equal(a, b), float((a - b).abs().max())


def test_one_optimizer_step_is_bit_identical(record):
    h, ours, theirs = _pair(record)
    opts = build_optimizers(ours, TrainConfig())
    opts.named["matrix"].param_groups[0]["record_bf16"] = True  # the record's Muon runs NS5 in bf16
    rec = record.Optimizers(h, theirs)
    for group in rec.optimizer_muon.param_groups:
        group["momentum"] = h.muon_momentum_warmup_start
    opts.apply_schedule(0, 1.0)
    g = torch.Generator().manual_seed(2)
    for (n, p), (m, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n == m
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    opts.step()
    rec.step()
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(p, q), (n, float((p - q).abs().max()))


def test_gptq_codes_and_scales_match(record):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(4096, 512, generator=g) * (0.2 + torch.rand(512, generator=g))
    H = x.T @ x / 4096
    q_rec, s_rec = record.gptq_quantize_weight(w, H, clip_sigmas=12.85, clip_range=31)
    spec = get_policy("record").spec_for("blocks.0.mlp.fc.weight", torch.zeros(2048, 512))
    q = gptq_quantize(w, H, bits=spec.bits, clip_rule=spec.clip, clip_params=spec.clip_params)
    assert torch.equal(q.scale.reshape(-1), s_rec)
    assert torch.equal(q.codes, q_rec)  # bit for bit: same factorisations, same update order


def test_data_order_matches_the_records_loader(record, tmp_path):
    from qlab.data.shards import write_shard

    sizes = (64 * 40 + 7, 64 * 25 + 1, 64 * 33 + 50, 64 * 12 + 3)
    files = [str(write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(n) % 500 + i))
             for i, n in enumerate(sizes)]  # fmt: skip
    for rank, world in ((0, 1), (1, 2)):
        h = _hparams(record, rank=rank, world_size=world, train_files=str(tmp_path / "fineweb_train_*.bin"))
        theirs = record.ShuffledSequenceLoader(h, torch.device("cpu"))
        ours = RecordSequenceLoader(files, h.train_seq_len, rank, world)
        for _ in range(30):  # past one pass over the shards: the re-cut too
            xr, yr = theirs.next_batch(64 * 8 * world, 1)
            xo, yo = ours.next_batch(8)
            assert torch.equal(xr, xo) and torch.equal(yr, yo)


def test_sliding_bpb_matches(record, tiny_dataset, no_compile):
    h, ours, theirs = _pair(record)
    h.tokenizer_path = str(tiny_dataset.tokenizer_path)
    h.val_files = str(tiny_dataset.root / "val_*.bin")
    h.val_batch_tokens, h.eval_stride = 64 * 8, 32
    val = record.ValidationData(h, torch.device("cpu"))
    ours.set_looping(True)
    theirs.looping_active = True
    with torch.no_grad():
        loss_r, bpb_r = record.eval_val_sliding(h, torch.device("cpu"), val, theirs)
        from qlab.data import build_byte_tables, load_tokenizer

        tables = build_byte_tables(load_tokenizer(tiny_dataset.tokenizer_path), h.vocab_size)
        r = evaluate_bpb(ours, val.val_tokens, tables, seq_len=64, batch_seqs=8, stride=32)
    np.testing.assert_allclose(r.val_bpb, bpb_r, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.val_loss, loss_r, rtol=0, atol=1e-9)


def test_ten_training_steps_match(record, tiny_dataset, tmp_path, monkeypatch):
    """qlab's trainer (--loader record) against the record's own loop pieces, 10 steps
    from the same init: loader, grad accumulation, warm-down, momentum warm-up, loop
    switch at 50 %, grad clip, Muon (NS5 in bf16, as the record runs it) and fused AdamW."""
    import qlab.train.trainer as T
    from qlab.io.checkpoint import resume_state

    steps, accum = 10, 8
    shards = str(tiny_dataset.root / "train_*.bin")
    h = _hparams(record, iterations=steps, warmup_steps=0, train_batch_tokens=64 * 2 * accum,
                 grad_accum_steps=accum, muon_momentum_warmup_steps=4, world_size=1, rank=0,
                 vocab_size=tiny_dataset.vocab_size, train_files=shards)  # fmt: skip
    cfg = _qlab_config(h)
    real_build = T.build_optimizers

    def record_muon(model, config):
        opts = real_build(model, config)
        opts.named["matrix"].param_groups[0]["record_bf16"] = True
        return opts

    monkeypatch.setattr(T, "build_optimizers", record_muon)
    train_cfg = TrainConfig(
        iterations=steps, train_batch_tokens=h.train_batch_tokens, train_seq_len=64, grad_accum=accum,
        max_wallclock_seconds=0.0, gptq_reserve_seconds=0.0, warmup_steps=0, ema_decay=0.0, loader="record",
        muon_momentum_warmup_steps=4, val_every=0, val_max_tokens=4097, log_every=1, checkpoint_every=0,
        device="cpu", data=str(tiny_dataset.root), out_dir=str(tmp_path / "q"), seed=7,
    )  # fmt: skip
    torch.manual_seed(7)
    init = GPT(cfg).state_dict()
    T.train(train_cfg, cfg, progress=False)
    ours = resume_state(tmp_path / "q")["model"]

    theirs = record.GPT(h)
    theirs.load_state_dict(init, strict=True)
    opts = record.Optimizers(h, theirs)
    loader = record.ShuffledSequenceLoader(h, torch.device("cpu"))
    for step in range(steps):
        frac = step / steps
        scale = max((1.0 - frac) / h.warmdown_frac, h.min_lr) if frac >= 1.0 - h.warmdown_frac else 1.0
        if not theirs.looping_active and frac >= h.enable_looping_at:
            theirs.looping_active = True
        opts.zero_grad_all()
        for _ in range(accum):
            x, y = loader.next_batch(h.train_batch_tokens, accum)
            (theirs(x, y) / accum).backward()
        t = min(step / h.muon_momentum_warmup_steps, 1.0)
        for group in opts.optimizer_muon.param_groups:
            group["momentum"] = (1 - t) * h.muon_momentum_warmup_start + t * h.muon_momentum
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), h.grad_clip_norm)
        opts.step()
    worst = max(float((ours[k] - v).abs().max()) for k, v in theirs.state_dict().items())
    print(f"10-step max |Δw| = {worst:.3g}")
    assert worst <= 1e-6, worst
