"""Property-based fuzzing of every input format qlab reads.

For each format a valid seed file is written by qlab itself, then mutated (bytes
flipped, truncated, spliced, repeated, JSON fields replaced by hostile values); loading
the result must either succeed or raise a QlabError — never any other exception — and
stay within a time and memory bound. ``QLAB_FUZZ_EXAMPLES`` sets the examples per
format (default 60 in ``make test``; ``make fuzz`` runs 1,000).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memprobe import run_in_child
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
    """Run ``fn`` in a forked child: success or QlabError only, within the time and memory
    bounds, memory measured as the child's own peak RSS (not the suite's high-water mark)."""
    rep = run_in_child(fn, cap_mib=2 * MAX_RSS_GROWTH_MIB)
    if rep.error is not None and not isinstance(rep.error, QlabError):
        raise AssertionError(f"not a QlabError:\n{rep.trace}")
    assert rep.seconds < MAX_SECONDS, f"took {rep.seconds:.1f} s"
    assert rep.growth_mib < MAX_RSS_GROWTH_MIB, f"peak RSS grew {rep.growth_mib:.0f} MiB"


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


SPEC = {"name": "m", "seeds": [0, 1], "bases": {"a": {"preset": "tiny", "train": {"iterations": 2}}},
        "variants": ["control", "qahsp=0.1"], "quant": {"weight_policies": ["record_small"]},
        "eval": {"val_max_tokens": 4096}}  # fmt: skip
SPEC_TOML = b"""name = "m"
seeds = [0, 1]
variants = ["control", "qahsp=0.1"]

[bases.a]
preset = "tiny"

[bases.a.train]
iterations = 2

[quant]
weight_policies = ["record_small"]

[eval]
val_max_tokens = 4096
"""


def test_matrix_specs_yaml(tmp_path):
    assert load_spec(_write(tmp_path, "ok.yaml", json.dumps(SPEC).encode())).name == "m"

    @FUZZ
    @given(obj=json_mutated(SPEC), raw=st.booleans(), junk=mutated(json.dumps(SPEC).encode()))
    def run(obj, raw, junk):
        # JSON is YAML: structured mutations reach the validator, byte mutations the parser
        path = _write(tmp_path, "m.yaml", junk if raw else json.dumps(obj).encode())
        _bounded(lambda: load_spec(path))

    run()


def test_matrix_specs_toml(tmp_path):
    assert load_spec(_write(tmp_path, "ok.toml", SPEC_TOML)).name == "m"

    @FUZZ
    @given(data=mutated(SPEC_TOML))
    def run(data):
        path = _write(tmp_path, "m.toml", data)
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


def _rehashed(header: dict, payload: bytes) -> bytes:
    """A v2 artifact of this header and payload, every hash a writer controls recomputed
    (the raw payload's SHA-256 cannot be: it is checked only after decoding)."""
    from qlab.compress import container as C

    header = dict(header, payload_length=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    raw = json.dumps(header).encode()
    return C._PREFIX.pack(C.MAGIC, C.VERSION, 0, len(raw), hashlib.sha256(raw).digest()) + raw + payload


def test_symbol_layout_headers_and_streams(seeds, tmp_path):
    """The ``--codec ans`` layout: its header fields (stream lengths, rest codec) and its
    symbol streams mutated, with the header and payload hashes recomputed, so every
    mutation reaches the symbol decoder."""
    from qlab.compress import container as C

    data = (seeds["dir"] / "w_ans.qlab").read_bytes()
    head, end = C._read_header_v2(data, "seed")
    header, payload = json.loads(head), data[end:]
    assert "symbols" in header

    @FUZZ
    @given(
        obj=json_mutated(header), stream=mutated(payload), which=st.sampled_from(["header", "stream", "both"])
    )
    def run(obj, stream, which):
        h = obj if which != "stream" else header
        p = stream if which != "header" else payload
        path = _write(tmp_path, "s.qlab", _rehashed(h, p))
        _bounded(lambda: load_state_dict(path))

    run()


HOSTILE_LEAF = st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.text(max_size=6), st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.integers(0, 3), st.none(), max_size=2),
    st.sampled_from([torch.zeros(0), torch.zeros(2, 0, 3), torch.ones(3, dtype=torch.bool),
                     torch.ones(2, 2, dtype=torch.complex64), torch.full((2, 2), 2**40, dtype=torch.int64),
                     torch.tensor(float("nan")), torch.ones(1, 1, 1, 1)]),
)  # fmt: skip


@st.composite
def ptz_tree_mutated(draw, tree):
    """A well-formed Parameter Golf tree with one value (or key) replaced by a hostile one."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    table = draw(st.sampled_from(sorted(tree)))
    node = tree[table]
    if isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        if draw(st.integers(0, 3)) == 0:
            node[draw(st.sampled_from([1, None, key + ".q", ""]))] = node.pop(key)
        else:
            node[key] = draw(HOSTILE_LEAF)
    else:
        tree[table] = draw(HOSTILE_LEAF)
    return tree


@pytest.mark.parametrize("layout", ["mixed", "clean"])
def test_ptz_trees_with_hostile_types(seeds, tmp_path, layout):
    """Well-formed ``.ptz`` object trees (so mutations get past the decompressor and the
    unpickler) with hostile types and names in them."""
    model = seeds["model"]
    qm = quantize_model(model, record_policy("record_small"))
    mixed = ptz_tree(qm.quantized_state)
    if layout == "mixed":
        tree = mixed
    else:
        q = {n[:-2]: t for n, t in mixed["w"].items() if n.endswith(".q")}
        tree = {"__quant_format__": "int8_clean_per_row_v1", "quantized": q,
                "scales": {n: mixed["w"][n + ".scale"] for n in q},
                "passthrough": {n: t for n, t in mixed["w"].items() if not n.endswith((".q", ".scale"))},
                "passthrough_orig_dtypes": {}}  # fmt: skip
    path = _write(tmp_path, "seed.ptz", ptz_bytes(tree, codec="brotli-5"))
    assert load_state_dict(path)

    @FUZZ
    @given(obj=ptz_tree_mutated(tree))
    def run(obj):
        path = _write(tmp_path, "t.ptz", ptz_bytes(obj, codec="brotli-1"))
        _bounded(lambda: load_state_dict(path))

    run()
