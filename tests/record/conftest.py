"""The optional equivalence suite against PR #1394's own ``train_gpt_human.py``.

Runs only when ``QLAB_RECORD_DIR`` points at a checkout of openai/parameter-golf; the
record's file is imported unmodified, with two stand-ins a CPU needs: ``flash_attn_interface``
becomes scaled-dot-product attention (same maths, (B, T, H, D) layout, grouped KV heads),
and ``torch.compile`` is the identity while the module is imported and used.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

RECORD_FILE = "records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2/train_gpt_human.py"


def _flash_attn_func(q, k, v, causal=True):
    """flash-attn 3's call on (B, T, H, D) tensors, by SDPA."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


@pytest.fixture(scope="session")
def record():
    root = os.environ.get("QLAB_RECORD_DIR")
    if not root:
        pytest.skip("QLAB_RECORD_DIR is not set (a checkout of openai/parameter-golf)")
    path = Path(root) / RECORD_FILE
    if not path.is_file():
        pytest.fail(f"QLAB_RECORD_DIR={root}: {RECORD_FILE} not found")
    sys.modules.setdefault("flash_attn_interface", types.SimpleNamespace(flash_attn_func=_flash_attn_func))
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    try:
        spec = importlib.util.spec_from_file_location("pr1394_train_gpt", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        torch.compile = compile_
    return module


@pytest.fixture()
def no_compile(monkeypatch):
    """The record compiles inside its functions too; keep those calls eager."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
