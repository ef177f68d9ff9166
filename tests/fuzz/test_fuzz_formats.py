"""Property-based fuzzing of every input format qlab reads.

For each format a valid seed file is written by qlab itself, then mutated (bytes
flipped, truncated, spliced, repeated, JSON fields replaced by hostile values); loading
the result must either succeed or raise a QlabError — never any other exception — and
stay within a time and memory bound. ``QLAB_FUZZ_EXAMPLES`` sets the examples per
format (default 60 in ``make test``; ``make fuzz`` runs 1,000).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from qlab.analysis.matrix.spec import load_spec
from qlab.compress.ptz import ptz_bytes, ptz_tree
from qlab.config import get_preset
from qlab.data.dataset import open_dataset
from qlab.data.shards import read_shard, write_shard
from qlab.data.tokenizer import load_tokenizer
from qlab.errors import QlabError
from qlab.loaders import load_model, save_quantized
from qlab.loaders.readers import load_state_dict
from qlab.quant.model_quant import quantize_model
from qlab.quant.policy import load_policy, record_policy
from qlab.train.config import TrainConfig

EXAMPLES = int(os.environ.get("QLAB_FUZZ_EXAMPLES", "60"))
MAX_SECONDS = 10.0
MAX_RSS_GROWTH_MIB = 1024

FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)  # fmt: skip


# ------------------------------------------------------------------ mutations


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """A hostile variant of ``seed``: a few of flip / truncate / splice / repeat / zero."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "splice", "repeat", "zero", "byte"]))
        n = len(data)
        if n == 0:
            break
        i = draw(st.integers(0, n - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "splice":
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "repeat":
            j = draw(st.integers(i, min(n, i + 256)))
            data[i:i] = data[i:j] * draw(st.integers(1, 8))
        else:
            j = draw(st.integers(i, min(n, i + 64)))
            data[i:j] = bytes(j - i)
    return bytes(data)


HOSTILE_JSON = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.just("../../etc/passwd"), st.just([0, 2**64]), st.just({"a": [1, {"b": None}]}),
    st.just("[" * 5000), st.lists(st.integers(-3, 3), max_size=4),
)  # fmt: skip


@st.composite
def json_mutated(draw, obj):
    """``obj`` with one value somewhere replaced by a hostile JSON value (or a key removed)."""
    obj = json.loads(json.dumps(obj))
    paths = list(_paths(obj))
    if not paths:
        return obj
    path = draw(st.sampled_from(paths))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = draw(HOSTILE_JSON)
    return obj


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _bounded(fn) -> None:
    """Run ``fn``: success or QlabError only, within the time and memory bounds."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with contextlib.suppress(QlabError):
        fn()
    elapsed = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert elapsed < MAX_SECONDS, f"took {elapsed:.1f} s"
    assert grown < MAX_RSS_GROWTH_MIB, f"peak RSS grew {grown:.0f} MiB"


# ------------------------------------------------------------------ seeds (written by qlab)


def _small_model():
    torch.manual_seed(0)
    from qlab.model.gpt import GPT

    cfg = get_preset("tiny").replace(
        vocab_size=64, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, rope_dims=8,
        loop_layers=None, train_seq_len=16, eval_seq_len=16,
    )  # fmt: skip
    return GPT(cfg)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_dataset):
    d = tmp_path_factory.mktemp("seeds")
    model = _small_model()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "w.safetensors"))
    torch.save(sd, d / "w.pt")
    qm = quantize_model(model, record_policy("record_small"))
    (d / "w.ptz").write_bytes(ptz_bytes(ptz_tree(qm.quantized_state), codec="brotli-5"))
    save_quantized(d / "w.qlab", qm, record_policy("record_small"), codec="brotli-5")
    save_quantized(d / "w_ans.qlab", qm, record_policy("record_small"), codec="ans")
    write_shard(d / "s.bin", np.arange(300) % 64)
    policy = {"name": "p", "rules": [{"pattern": "*", "ndim": 2, "min_numel": 10,
                                      "spec": {"method": "rtn", "bits": 6, "clip": "sdclip",
                                               "clip_params": {"k": 12.85}}}]}  # fmt: skip
    (d / "p.json").write_text(json.dumps(policy))
    tokenizer = Path(tiny_dataset.tokenizer_path).read_bytes()
    return {"dir": d, "policy": policy, "model": model, "tokenizer": tokenizer}


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------ one test per format


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt", "w.ptz", "w.qlab", "w_ans.qlab"])
def test_checkpoint_formats(seeds, tmp_path, name):
    seed = (seeds["dir"] / name).read_bytes()

    @FUZZ
    @given(data=mutated(seed))
    def run(data):
        path = _write(tmp_path, name, data)
        _bounded(lambda: load_state_dict(path))

    run()


def test_token_shards(seeds, tmp_path):
    seed = (seeds["dir"] / "s.bin").read_bytes()

    @FUZZ
    @given(data=mutated(seed))
    def run(data):
        path = _write(tmp_path, "s.bin", data)
        _bounded(lambda: read_shard(path, vocab_size=64))

    run()


def test_tokenizer_models(seeds, tmp_path):
    @FUZZ
    @given(data=mutated(seeds["tokenizer"]))
    def run(data):
        path = _write(tmp_path, "t.model", data)
        _bounded(lambda: load_tokenizer(path))

    run()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_policy_files(seeds, tmp_path, suffix):
    text = json.dumps(seeds["policy"]).encode()

    @FUZZ
    @given(obj=json_mutated(seeds["policy"]), raw=st.booleans(), junk=mutated(text))
    def run(obj, raw, junk):
        data = junk if raw else json.dumps(obj).encode()
        path = _write(tmp_path, "p" + suffix, data)
        _bounded(lambda: load_policy(path))

    run()


def test_dataset_meta(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(tiny_dataset.root, root)
    meta = json.loads((root / "meta.json").read_text())

    @FUZZ
    @given(obj=json_mutated(meta))
    def run(obj):
        (root / "meta.json").write_text(json.dumps(obj))
        _bounded(lambda: open_dataset(root))

    run()


def test_run_directory_config(seeds, tmp_path):
    from qlab.io.checkpoint import save_checkpoint

    run_dir = tmp_path / "run"
    model = seeds["model"]
    save_checkpoint(run_dir, model, None, SimpleNamespace(state_dict=dict), {"step": 0, "tokens_seen": 0},
                    model.config, TrainConfig())  # fmt: skip
    cfg = json.loads((run_dir / "config.json").read_text())

    @FUZZ
    @given(obj=json_mutated(cfg))
    def run(obj):
        (run_dir / "config.json").write_text(json.dumps(obj))
        _bounded(lambda: load_model(run_dir))

    run()


def test_matrix_specs(tmp_path):
    spec = {"name": "m", "seeds": [0], "bases": {"a": {"preset": "tiny", "iterations": 2}},
            "variants": ["control"], "quant": {"policy": "record_small"}}  # fmt: skip

    @FUZZ
    @given(obj=json_mutated(spec))
    def run(obj):
        path = _write(tmp_path, "m.json", json.dumps(obj).encode())
        _bounded(lambda: load_spec(path))

    run()


def test_torch_pickles_are_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "owned"),))

    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    path = _write(tmp_path, "evil.pt", buf.getvalue())
    with pytest.raises(QlabError):
        load_state_dict(path)
    assert not (tmp_path / "owned").exists()


def test_qlab_artifact_headers(seeds, tmp_path):
    """Structured mutations of a .qlab header (its JSON is compressed, so byte flips rarely
    reach the fields): every field replaced by hostile values, hashes kept consistent."""
    import hashlib

    from qlab.compress import container as C

    data = (seeds["dir"] / "w.qlab").read_bytes()
    head, end = C._read_header_v2(data, "seed")
    header, payload = json.loads(head), data[end:]

    def build(h: dict) -> bytes:
        raw = json.dumps(h).encode()
        return C._PREFIX.pack(C.MAGIC, C.VERSION, 0, len(raw), hashlib.sha256(raw).digest()) + raw + payload

    @FUZZ
    @given(obj=json_mutated(header))
    def run(obj):
        path = _write(tmp_path, "h.qlab", build(obj))
        _bounded(lambda: load_state_dict(path))

    run()
