"""QAT, SWA and the entropy-bucket curriculum wired into the training loop (issue #6)."""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from trainkit import SEQ, model_config, train_config

from qlab.data.shards import read_shard
from qlab.errors import ConfigError
from qlab.io import checkpoint as ckpt
from qlab.io.runlog import read_runlog
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize
from qlab.train import trainer as T
from qlab.train.config import TrainConfig, resolve_configs
from qlab.train.qat import disable_qat, fake_quant, qat_modules
from qlab.train.trainer import train


def train_log(run_dir):
    return read_runlog(run_dir).query("kind == 'train'")


def rtn_reference(model: nn.Module, bits: int, k: float, patterns) -> nn.Module:
    """A QAT-free copy of ``model`` whose matching linear weights are RTN-dequantized."""
    ref = copy.deepcopy(model)
    assert disable_qat(ref)
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear) and any(fnmatch.fnmatchcase(f"{name}.weight", p) for p in patterns):
            w = mod.weight.data
            q = quantize_rtn(w, bits, granularity="row", clip="sdclip", clip_params={"k": k})
            mod.weight.data = dequantize(q).to(w.dtype)
    return ref


def test_qat_switches_on_at_its_fraction_and_fake_quantizes(tiny_dataset, tmp_path, monkeypatch):
    mc = model_config(tiny_dataset.vocab_size, loop=False)
    seen, checks = [], {}
    original = T._Trainer.timed_step
    x = torch.randint(0, tiny_dataset.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)

    def spy(self):
        names = qat_modules(self.model)
        seen.append((self.step, len(names)))
        if names and "qat" not in checks:
            params = [id(p) for p in self.model.parameters()]
            assert all(id(p) in params for opt in self.opts for g in opt.param_groups for p in g["params"])
            with torch.no_grad():
                checks["qat"] = self.model(x, y).item()
                checks["ref"] = rtn_reference(self.model, 4, 3.0, ["blocks.*.weight"])(x, y).item()
                checks["names"] = names
        return original(self)

    monkeypatch.setattr(T._Trainer, "timed_step", spy)
    train(train_config(tiny_dataset, tmp_path / "qat", qat_bits=4, qat_k=3.0, qat_start_frac=0.5), mc,
          progress=False)  # fmt: skip
    monkeypatch.setattr(T._Trainer, "timed_step", original)
    train(train_config(tiny_dataset, tmp_path / "plain"), mc, progress=False)

    # on from step index 3 = 0.5 · 6 iterations, on all 12 block matrices
    assert seen == [(0, 0), (1, 0), (2, 0), (3, 12), (4, 12), (5, 12)]
    assert len(checks["names"]) == 12 and all(n.startswith("blocks.") for n in checks["names"])
    assert checks["qat"] == pytest.approx(checks["ref"], rel=1e-6, abs=1e-6)
    qat, plain = train_log(tmp_path / "qat"), train_log(tmp_path / "plain")
    assert qat.train_loss.iloc[:3].tolist() == plain.train_loss.iloc[:3].tolist()
    assert qat.train_loss.iloc[3] != plain.train_loss.iloc[3]
    # the fp weights keep training: they are not on the int4 grid, and the checkpoint says QAT was on
    state = ckpt.resume_state(tmp_path / "qat")
    w = state["model"]["blocks.0.mlp.fc.weight"]
    assert not torch.equal(fake_quant(w, 4, 3.0), w)
    assert state["trainer"]["qat_on"] is True
    assert ckpt.resume_state(tmp_path / "plain")["trainer"]["qat_on"] is False


@pytest.mark.parametrize("ema_decay", [0.9, 0.0])
def test_swa_blend_is_shipped(tiny_dataset, tmp_path, monkeypatch, ema_decay):
    raw = {}
    original = T._Trainer.timed_step

    def spy(self):
        out = original(self)
        raw[self.step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return out

    monkeypatch.setattr(T._Trainer, "timed_step", spy)
    cfg = train_config(tiny_dataset, tmp_path / "swa", iterations=8, warmdown_frac=0.5, swa_every=2,
                       swa_blend=0.3, ema_decay=ema_decay)  # fmt: skip
    train(cfg, model_config(tiny_dataset.vocab_size, loop=False), progress=False)

    log = train_log(tmp_path / "swa")
    snaps = [s for s, m in zip(log.step, log.lr_mult) if s % 2 == 0 and m < 1.0]
    assert snaps == [6, 8]  # warm-down: lr_mult < 1 from step 6 (frac 5/8 > 0.5)
    swa = {k: torch.stack([raw[s][k].float() for s in snaps]).mean(0) for k in raw[8]}
    state = ckpt.resume_state(tmp_path / "swa")
    if ema_decay:
        expected = {k: 0.3 * state["ema"][k].float() + 0.7 * swa[k] for k in swa}
    else:
        expected = swa
    shipped, cfg_json = ckpt.load_checkpoint(tmp_path / "swa")
    assert shipped.keys() == expected.keys()
    for k in shipped:
        torch.testing.assert_close(shipped[k].float(), expected[k], rtol=0, atol=1e-6)
    kind = "ema+swa" if ema_decay else "swa"
    assert cfg_json["weights"] == kind
    assert read_runlog(tmp_path / "swa").query("kind == 'final'").weights.iloc[0] == kind
    assert state["trainer"]["swa"]["count"] == 2
    for k in state["model"]:  # the raw weights are untouched by the blend
        assert torch.equal(state["model"][k], raw[8][k])


def _windows_by_bucket(data) -> dict[tuple, int]:
    """Every training window → its entropy bucket (2 buckets, by rank), computed by hand."""
    windows = []
    for f in data.train_files:
        tokens = read_shard(f).astype(np.int64)
        windows += [tuple(tokens[s : s + SEQ + 1]) for s in range(0, len(tokens) - SEQ, SEQ)]

    def entropy(w):
        return -sum(c / len(w) * np.log2(c / len(w)) for c in Counter(w).values())

    order = sorted(range(len(windows)), key=lambda i: entropy(windows[i]))
    return {windows[i]: rank * 2 // len(windows) for rank, i in enumerate(order)}


def test_curriculum_draws_easy_sequences_first(tiny_dataset, tmp_path, monkeypatch):
    seen = []
    original = T.LossWithRegularizers.forward

    def spy(self, x, y):
        seen.append(torch.cat([x, y[:, -1:]], dim=1))
        return original(self, x, y)

    monkeypatch.setattr(T.LossWithRegularizers, "forward", spy)
    cfg = train_config(
        tiny_dataset, tmp_path / "cur", iterations=2, curriculum_buckets=2, curriculum_floor=0.0
    )
    train(cfg, model_config(tiny_dataset.vocab_size, loop=False), progress=False)
    buckets = _windows_by_bucket(tiny_dataset)
    first = torch.cat(seen[:2])  # two micro-batches of step 1, at training fraction 0
    assert first.shape == (4, SEQ + 1)
    assert [buckets[tuple(r.tolist())] for r in first] == [0, 0, 0, 0]  # all from the easy half
    assert all(tuple(r.tolist()) in buckets for r in torch.cat(seen[2:]))
    state = ckpt.resume_state(tmp_path / "cur")["trainer"]["curriculum"]
    assert state["calls"] == 2 and sum(state["cursors"]) == 8


def test_resume_with_qat_swa_curriculum_is_bit_exact(tiny_dataset, tmp_path, monkeypatch):
    mc = model_config(tiny_dataset.vocab_size, loop=True)
    extras = dict(iterations=8, warmdown_frac=0.75, qat_bits=6, qat_start_frac=0.25, swa_every=2,
                  curriculum_buckets=2, curriculum_floor=0.1)  # fmt: skip
    train(train_config(tiny_dataset, tmp_path / "full", **extras), mc, progress=False)

    part = train_config(tiny_dataset, tmp_path / "part", checkpoint_every=4, **extras)
    original = T._Trainer.timed_step

    def crash(self):
        if self.step == 6:
            raise RuntimeError("simulated kill")
        return original(self)

    monkeypatch.setattr(T._Trainer, "timed_step", crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(part, mc, progress=False)
    at_kill = ckpt.resume_state(tmp_path / "part")
    assert at_kill["step"] == 4
    t = at_kill["trainer"]
    assert t["qat_on"] and t["swa"]["count"] == 1 and t["curriculum"]["calls"] == 4

    monkeypatch.setattr(T._Trainer, "timed_step", original)
    restored = T._Trainer(part, mc, True, False)  # the loaded state, before any step runs
    assert len(qat_modules(restored.model)) == 12 and restored.swa.count == 1
    assert restored.sampler.state_dict() == t["curriculum"]
    del restored
    train(part, mc, resume=True, progress=False)
    a, b = ckpt.resume_state(tmp_path / "full"), ckpt.resume_state(tmp_path / "part")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
        assert torch.equal(a["trainer"]["swa"]["mean"][k], b["trainer"]["swa"]["mean"][k]), k
    assert a["trainer"]["curriculum"] == b["trainer"]["curriculum"]
    wa, wb = ckpt.load_checkpoint(tmp_path / "full")[0], ckpt.load_checkpoint(tmp_path / "part")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert train_log(tmp_path / "part").step.tolist() == list(range(1, 9))
    assert json.loads((tmp_path / "part" / "config.json").read_text())["weights"] == "ema+swa"


def test_config_env_and_cli_flags(tmp_path):
    env = {"QAT_BITS": "6", "QAT_K": "10", "QAT_START_FRAC": "0.4", "SWA_EVERY": "50", "SWA_BLEND": "0.6",
           "CURRICULUM_BUCKETS": "8", "CURRICULUM_FLOOR": "0.02"}  # fmt: skip
    cfg, _ = resolve_configs("tiny", env=env)
    assert (cfg.qat_bits, cfg.qat_k, cfg.qat_start_frac) == (6, 10.0, 0.4)
    assert (cfg.swa_every, cfg.swa_blend, cfg.curriculum_buckets, cfg.curriculum_floor) == (50, 0.6, 8, 0.02)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON round trip
    off = TrainConfig()
    assert (off.qat_bits, off.swa_every, off.curriculum_buckets) == (0, 0, 0)
    assert TrainConfig(qat_patterns=("blocks.0.*",)).qat_patterns == ["blocks.0.*"]
    bads = [{"qat_bits": 1}, {"qat_bits": 9}, {"qat_k": 0.0}, {"qat_start_frac": 1.5}, {"swa_every": -1},
            {"swa_blend": 2.0}, {"curriculum_buckets": 4, "curriculum_floor": 0.3},
            {"qat_patterns": []}]  # fmt: skip
    for bad in bads:
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="QAT_BITS"):
        resolve_configs("tiny", env={"QAT_BITS": "six"})

    from qlab.cli.train import build_configs, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "--out", str(tmp_path / "r"), "--qat-bits", "5", "--qat-k", "4", "--qat-start", "0.3",
         "--swa-every", "7", "--swa-blend", "0.25", "--curriculum-buckets", "4", "--curriculum-floor", "0.1"]
    )  # fmt: skip
    cfg, _, _ = build_configs(args, env={})
    assert (cfg.qat_bits, cfg.qat_k, cfg.qat_start_frac, cfg.swa_every, cfg.swa_blend) == (
        5,
        4.0,
        0.3,
        7,
        0.25,
    )
    assert (cfg.curriculum_buckets, cfg.curriculum_floor) == (4, 0.1)
