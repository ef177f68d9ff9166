"""The trainer with --loader record: resumes to the same weights, and reads other data than qlab's."""

from __future__ import annotations

import torch
from trainkit import model_config, train_config

from qlab.io import checkpoint as ckpt
from qlab.train.trainer import train


def _weights(run):
    return ckpt.resume_state(run)["model"]


def test_record_loader_resume_is_bit_exact(tiny_dataset, tmp_path):
    m = model_config(tiny_dataset.vocab_size, loop=False)
    kw = dict(loader="record", warmdown_frac=0.0, checkpoint_every=2)
    train(train_config(tiny_dataset, tmp_path / "full", iterations=5, **kw), m, progress=False)
    train(train_config(tiny_dataset, tmp_path / "cut", iterations=2, **kw), m, progress=False)
    state = ckpt.resume_state(tmp_path / "cut")
    loader = state["trainer"]["loader"]
    assert loader["kind"] == "record" and loader["drawn"] == 2 * 4  # 4 sequences a step
    cfg = train_config(tiny_dataset, tmp_path / "cut", iterations=5, **kw)
    train(cfg, m, resume=True, progress=False)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train(train_config(tiny_dataset, tmp_path / "qlab", iterations=5, warmdown_frac=0.0), m, progress=False)
    q = _weights(tmp_path / "qlab")
    assert not all(torch.equal(a[k], q[k]) for k in a)  # a different data order
