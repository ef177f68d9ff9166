"""Checkpoint readers: every format round-trips, every bad input gets a clear CheckpointError."""

from __future__ import annotations

import dataclasses
import io
import json
import lzma
import pickle
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qlab.loaders.readers as readers
from benchmarks.bench_reader_memory import synthetic_layout, write_synthetic_safetensors
from qlab.errors import CheckpointError
from qlab.io.formats import load_torch_file, release_pages
from qlab.loaders.readers import (
    FORMATS,
    TensorInfo,
    detect_format,
    iter_tensors,
    list_tensors,
    load_state_dict,
)
from qlab.quant.tensor import QuantizedTensor, dequantize


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_emb.weight": torch.randn(16, 8, generator=g),
        "blocks.0.attn.c_q.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.fc.weight": torch.randn(12, 8, generator=g).to(torch.float16),
        "blocks.0.attn_scale": torch.rand(8, generator=g, dtype=torch.float64),
        "skip_weights": torch.randn(3, generator=g),
        "steps": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.randint(-8, 8, (4, 4), generator=g, dtype=torch.int8),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert tuple(got[k].shape) == tuple(v.shape), k
        assert torch.equal(got[k], v), k


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


# --------------------------------------------------------------------------- round trips


def test_safetensors_round_trip_and_listing(tmp_path):
    sd = _state()
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p), metadata={"note": "x"})
    assert detect_format(p) == "safetensors"
    _assert_same(load_state_dict(p), sd)
    infos = {i.name: i for i in list_tensors(p)}
    assert set(infos) == set(sd)
    for k, v in sd.items():
        dtype = str(v.dtype).removeprefix("torch.")
        assert infos[k] == TensorInfo(k, tuple(v.shape), dtype, v.numel(), str(p))


def test_safetensors_sniffed_without_extension(tmp_path):
    sd = _state()
    p = tmp_path / "weights"
    save_file(sd, str(p))
    assert detect_format(p) == "safetensors"
    _assert_same(load_state_dict(p), sd)


def test_yielded_tensors_are_owned_and_in_storage_order(tmp_path):
    sd = _state()
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    names = [n for n, _ in iter_tensors(p)]
    assert names == [i.name for i in list_tensors(p)]
    raw = p.read_bytes()  # storage order = ascending data offset in the raw header
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    assert names == sorted(header, key=lambda k: header[k]["data_offsets"][0])
    a = dict(iter_tensors(p))
    a["tok_emb.weight"].mul_(0)  # must not affect a second read
    assert torch.equal(load_state_dict(p)["tok_emb.weight"], sd["tok_emb.weight"])


def test_fp8_widened_to_float32(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8")
    x = torch.randn(4, 6).to(torch.float8_e4m3fn)
    y = torch.randn(5).to(torch.float8_e5m2)
    p = tmp_path / "fp8.safetensors"
    save_file({"x": x, "y": y}, str(p))
    got = load_state_dict(p)
    assert got["x"].dtype == torch.float32 and torch.equal(got["x"], x.float())
    assert got["y"].dtype == torch.float32 and torch.equal(got["y"], y.float())


def test_dtype_cast_only_touches_floats(tmp_path):
    sd = _state()
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    got = load_state_dict(p, dtype="float32")
    for k, v in sd.items():
        want = v.float() if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    with pytest.raises(CheckpointError, match="unknown dtype"):
        iter_tensors(p, dtype="float13")


def test_qlab_run_directory(tmp_path):
    sd = _state()
    run = tmp_path / "run"
    run.mkdir()
    save_file(sd, str(run / "model.safetensors"))
    cfg = {"model": {"n_layer": 1}, "train": {}, "step": 3, "tokens_seen": 10, "qlab_version": "0.1.0"}
    (run / "config.json").write_text(json.dumps(cfg))
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, run / "optimizer.pt")
    assert detect_format(run) == "qlab-run"
    _assert_same(load_state_dict(run), sd)
    assert {i.source for i in list_tensors(run)} == {str(run / "model.safetensors")}


def test_qlab_run_written_by_save_checkpoint_and_staging_preferred(tmp_path):
    from qlab.io import checkpoint

    sd = _state()
    run = tmp_path / "run"
    run.mkdir()
    save_file(sd, str(run / checkpoint.WEIGHTS_NAME))
    cfg = {"model": {}, "train": {}, "step": 1, "tokens_seen": 0, "qlab_version": "0.1.0"}
    (run / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    # a complete staging folder (killed between the commit's moves) holds newer weights
    staging = run / checkpoint.STAGING_NAME
    staging.mkdir()
    newer = _state(seed=1)
    save_file(newer, str(staging / checkpoint.WEIGHTS_NAME))
    (staging / checkpoint.CONFIG_NAME).write_text(json.dumps({**cfg, "step": 2}))
    assert detect_format(run) == "qlab-run"
    _assert_same(load_state_dict(run), newer)


def test_hf_dir_with_single_safetensors(tmp_path):
    sd = _state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2"]}))
    assert detect_format(tmp_path) == "hf-sharded"
    _assert_same(load_state_dict(tmp_path), sd)


def _write_sharded(d: Path, sd: dict[str, torch.Tensor], n_shards: int, kind: str = "safetensors") -> dict:
    names = list(sd)
    weight_map = {}
    for s in range(n_shards):
        part = {n: sd[n] for n in names[s::n_shards]}
        ext = "safetensors" if kind == "safetensors" else "bin"
        prefix = "model" if kind == "safetensors" else "pytorch_model"
        fname = f"{prefix}-{s + 1:05d}-of-{n_shards:05d}.{ext}"
        if kind == "safetensors":
            save_file(part, str(d / fname))
        else:
            torch.save(part, d / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    idx_name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (d / idx_name).write_text(json.dumps(index))
    return weight_map


def test_hf_sharded_safetensors(tmp_path):
    sd = _state()
    wm = _write_sharded(tmp_path, sd, 3)
    assert detect_format(tmp_path) == "hf-sharded"
    _assert_same(load_state_dict(tmp_path), sd)
    infos = list_tensors(tmp_path)
    assert {i.name: Path(i.source).name for i in infos} == wm
    # the index file itself is accepted too
    index = tmp_path / "model.safetensors.index.json"
    assert detect_format(index) == "hf-sharded"
    _assert_same(load_state_dict(index), sd)
    # a subset spanning shards
    subset = ["tok_emb.weight", "mask", "skip_weights"]
    got = dict(iter_tensors(tmp_path, names=subset))
    _assert_same(got, {k: sd[k] for k in subset})


def test_hf_sharded_torch_bin(tmp_path):
    sd = _state()
    _write_sharded(tmp_path, sd, 2, kind="torch")
    assert detect_format(tmp_path) == "hf-sharded"
    _assert_same(load_state_dict(tmp_path), sd)
    _assert_same(dict(iter_tensors(tmp_path, names=["codes"])), {"codes": sd["codes"]})


def test_hf_dir_single_pytorch_model_bin(tmp_path):
    sd = _state()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert detect_format(tmp_path) == "hf-sharded"
    _assert_same(load_state_dict(tmp_path), sd)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "legacy"])
def test_torch_state_dicts(tmp_path, wrap):
    sd = _state()
    p = tmp_path / "ckpt.pt"
    if wrap == "plain":
        torch.save(sd, p)
    elif wrap == "legacy":  # pre-zip format: loaded without mmap
        torch.save(sd, p, _use_new_zipfile_serialization=False)
    else:
        torch.save({wrap: sd, "step": 7, "config": {"lr": 0.1}}, p)
    assert detect_format(p) == "torch"
    _assert_same(load_state_dict(p), sd)
    assert [i.name for i in list_tensors(p)] == list(sd)


def test_torch_nested_dicts_flatten_with_dots(tmp_path):
    a, b = torch.randn(3, 2), torch.randn(4)
    p = tmp_path / "nested.pth"
    torch.save({"model": {"encoder": {"w": a}, "head": {"b": b}}, "epoch": 2}, p)
    _assert_same(load_state_dict(p), {"encoder.w": a, "head.b": b})


def test_torch_tied_weights_survive_page_release(tmp_path):
    w = torch.randn(300, 257)  # > one page, not page aligned
    p = tmp_path / "tied.pt"
    torch.save({"tok_emb.weight": w, "lm_head.weight": w, "other": torch.randn(7)}, p)
    got = load_state_dict(p)
    assert torch.equal(got["tok_emb.weight"], w) and torch.equal(got["lm_head.weight"], w)
    sd, mapped = load_torch_file(p)
    assert mapped
    before = sd["other"].clone()
    release_pages(sd["tok_emb.weight"])
    assert torch.equal(sd["tok_emb.weight"], w) and torch.equal(sd["other"], before)


def test_benchmark_writer_produces_valid_safetensors(tmp_path):
    p = tmp_path / "syn.safetensors"
    size = write_synthetic_safetensors(p, 200_000, rows=16, cols=64)
    assert p.stat().st_size == size
    layout = synthetic_layout(200_000, 16, 64)
    with safe_open(str(p), framework="pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert [(k, ref[k].dtype) for k, _ in layout] == layout
    _assert_same(load_state_dict(p), ref)


# --------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("codec", ["brotli", "lzma"])
@pytest.mark.parametrize("shuffled", [False, True])
def test_ptz_artifact(tmp_path, codec, shuffled):
    # written here by hand (torch.save -> BSHF stride 2 -> brotli/lzma), read by qlab.compress.ptz
    sd = {k: v for k, v in _state().items() if v.dtype != torch.bool}
    buf = io.BytesIO()
    torch.save(sd, buf)
    raw = buf.getvalue()
    if shuffled:
        raw = b"BSHF" + bytes([2]) + raw[0::2] + raw[1::2]
    blob = brotli.compress(raw, quality=5) if codec == "brotli" else lzma.compress(raw, preset=6)
    p = tmp_path / "final_model.ptz"
    p.write_bytes(blob)
    assert detect_format(p) == "ptz"
    _assert_same(load_state_dict(p), sd)
    assert [i.name for i in list_tensors(p)] == list(sd)


def _write_ptz(path: Path, obj: object) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(brotli.compress(buf.getvalue(), quality=1))


def test_ptz_parameter_golf_int8_clean_format(tmp_path):
    g = torch.Generator().manual_seed(3)
    q2 = torch.randint(-127, 128, (6, 5), generator=g, dtype=torch.int8)
    s2 = (torch.rand(6, generator=g) * 0.01).to(torch.float16)
    q1 = torch.randint(-127, 128, (7,), generator=g, dtype=torch.int8)
    s1 = torch.tensor(0.003)
    gain = torch.rand(4, generator=g).to(torch.float16)
    obj = {
        "__quant_format__": "int8_clean_per_row_v1",
        "quantized": {"blocks.0.mlp.fc.weight": q2, "skip_weights": q1},
        "scales": {"blocks.0.mlp.fc.weight": s2, "skip_weights": s1},
        "dtypes": {"blocks.0.mlp.fc.weight": "bfloat16", "skip_weights": "float32"},
        "passthrough": {"blocks.0.attn.q_gain": gain, "steps": torch.arange(3)},
        "qmeta": {"blocks.0.mlp.fc.weight": {"scheme": "per_row", "axis": 0}},
        "passthrough_orig_dtypes": {"blocks.0.attn.q_gain": "float32"},
    }
    p = tmp_path / "final_model.int8.ptz"
    _write_ptz(p, obj)
    got = load_state_dict(p)
    w_hand = torch.stack([q2[i].float() * float(s2[i]) for i in range(6)])  # row by row
    assert got["blocks.0.mlp.fc.weight"].dtype == torch.float32
    assert torch.allclose(got["blocks.0.mlp.fc.weight"], w_hand, rtol=0, atol=1e-7)
    assert torch.allclose(got["skip_weights"], q1.float() * 0.003, rtol=0, atol=1e-7)
    assert got["blocks.0.attn.q_gain"].dtype == torch.float32
    assert torch.equal(got["blocks.0.attn.q_gain"], gain.float())
    assert torch.equal(got["steps"], torch.arange(3))
    raw = load_state_dict(p, raw_codes=True)
    assert torch.equal(raw["blocks.0.mlp.fc.weight"], q2) and raw["skip_weights"].dtype == torch.int8


def test_ptz_parameter_golf_mixed_int6_format(tmp_path):
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-31, 32, (4, 8), generator=g, dtype=torch.int8)
    s = (torch.rand(4, generator=g) * 0.02).to(torch.float16)
    ctrl = torch.rand(8, generator=g)
    w = {"blocks.0.attn.c_q.weight.q": q, "blocks.0.attn.c_q.weight.scale": s, "blocks.0.attn_scale": ctrl}
    m = {"blocks.0.attn.c_q.weight": {"type": "int6"}, "blocks.0.attn_scale": "passthrough_ctrl"}
    p = tmp_path / "final_model.int6.ptz"
    _write_ptz(p, {"w": w, "m": m})
    got = load_state_dict(p)
    want = torch.stack([q[i].float() * float(s[i]) for i in range(4)])
    assert torch.allclose(got["blocks.0.attn.c_q.weight"], want, rtol=0, atol=1e-7)
    assert torch.equal(got["blocks.0.attn_scale"], ctrl)
    # a variant with extra pieces (LQER) is refused by name unless codes are asked for
    m["blocks.0.attn.c_q.weight"] = {"type": "int6", "lqer": True, "lqer_rank": 4}
    _write_ptz(p, {"w": w, "m": m})
    with pytest.raises(CheckpointError, match="'blocks.0.attn.c_q.weight'.*variant.*raw_codes"):
        load_state_dict(p)
    assert torch.equal(load_state_dict(p, raw_codes=True)["blocks.0.attn.c_q.weight"], q)
    del w["blocks.0.attn.c_q.weight.q"]
    _write_ptz(p, {"w": w, "m": m})
    with pytest.raises(CheckpointError, match="lacks tensor 'blocks.0.attn.c_q.weight.q'"):
        load_state_dict(p, raw_codes=True)


def test_ptz_corrupt_is_a_checkpoint_error(tmp_path):
    p = tmp_path / "junk.ptz"
    p.write_bytes(b"\x00\x01 definitely not brotli" * 10)
    with pytest.raises(CheckpointError, match="junk.ptz"):
        load_state_dict(p)


def _quantized(w: torch.Tensor) -> QuantizedTensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 7
    codes = torch.clamp(torch.round(w / scale), -7, 7).to(torch.int8)
    return QuantizedTensor(codes=codes, scale=scale, zero=None, bits=4, shape=tuple(w.shape), scheme="int")


@pytest.fixture
def qlab_artifact(tmp_path):
    """A real .qlab file with a quantized, a float and a numpy entry."""
    from qlab.compress.container import write_artifact

    w, b = torch.randn(6, 10), torch.randn(6)
    q = _quantized(w)
    p = tmp_path / "model.qlab"
    write_artifact(p, {"fc.weight": q, "fc.bias": b, "pos": np.arange(4, dtype=np.int32)})
    return p, q, b


def test_qlab_artifact_dequantized_and_raw_codes(qlab_artifact):
    p, q, b = qlab_artifact
    assert detect_format(p) == "qlab-artifact"
    deq = load_state_dict(p)
    # dequantized by hand: codes · per-row scale
    want = q.codes.float() * q.scale
    assert torch.equal(deq["fc.weight"], want) and torch.equal(deq["fc.weight"], dequantize(q))
    assert torch.equal(deq["fc.bias"], b)
    raw = load_state_dict(p, raw_codes=True)
    assert raw["fc.weight"].dtype == torch.int8 and torch.equal(raw["fc.weight"], q.codes)
    assert torch.equal(deq["pos"], torch.arange(4, dtype=torch.int32))
    infos = {i.name: i for i in list_tensors(p)}
    assert infos["fc.weight"].shape == (6, 10) and infos["fc.weight"].dtype == "float32"
    assert infos["fc.weight"].numel == 60


def test_qlab_artifact_magic_without_extension(qlab_artifact, tmp_path):
    p, _, _ = qlab_artifact
    other = tmp_path / "artifact.bin"
    other.write_bytes(p.read_bytes())
    assert detect_format(other) == "qlab-artifact"


# --------------------------------------------------------------------------- bad input


def test_detect_format_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        detect_format(tmp_path / "missing.safetensors")
    junk = tmp_path / "notes.txt"
    junk.write_text("hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="unrecognised.*supported"):
        detect_format(junk)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint.*supported"):
        detect_format(empty)
    assert len(FORMATS) == 6


def test_truncated_safetensors_prefix(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match=r"short\.safetensors.*truncated"):
        list_tensors(p)


def test_safetensors_header_length_beyond_file(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes((10_000).to_bytes(8, "little") + b'{"a": 1}')
    with pytest.raises(CheckpointError, match=r"big\.safetensors.*header length"):
        iter_tensors(p)


def test_safetensors_invalid_json(tmp_path):
    p = tmp_path / "bad.safetensors"
    raw = b'{"a": {"dtype": "F32",'
    p.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*not valid JSON"):
        list_tensors(p)


def test_safetensors_truncated_data(tmp_path):
    p = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*'w'.*truncated"):
        load_state_dict(p)


def test_safetensors_offsets_inconsistent_with_shape(tmp_path):
    p = tmp_path / "off.safetensors"
    _write_raw_safetensors(p, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="'w'.*needs 16"):
        list_tensors(p)


def test_safetensors_complex_dtype_refused(tmp_path):
    p = tmp_path / "c.safetensors"
    _write_raw_safetensors(p, {"z": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="'z'.*unsupported dtype 'C64'"):
        list_tensors(p)


def test_torch_complex_dtype_refused(tmp_path):
    p = tmp_path / "c.pt"
    torch.save({"ok": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}, p)
    with pytest.raises(CheckpointError, match="'z'.*complex"):
        load_state_dict(p)


def test_missing_shard_named(tmp_path):
    _write_sharded(tmp_path, _state(), 3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*missing"):
        list_tensors(tmp_path)
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        iter_tensors(tmp_path)


def test_shard_lacking_an_indexed_tensor(tmp_path):
    _write_sharded(tmp_path, _state(), 2)
    idx = tmp_path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        list_tensors(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_reported_with_name(tmp_path, bad, dtype):
    w = torch.randn(9, 33).to(dtype)
    w[8, 32] = bad
    p = tmp_path / "nf.safetensors"
    save_file({"good": torch.ones(3), "blocks.1.mlp.fc.weight": w}, str(p))
    counts = "1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"
    with pytest.raises(CheckpointError, match=rf"'blocks\.1\.mlp\.fc\.weight'.*{counts}"):
        load_state_dict(p)
    got = load_state_dict(p, check_finite=False)
    assert torch.equal(got["blocks.1.mlp.fc.weight"].isnan(), w.isnan())


@dataclasses.dataclass
class _Wrapped:
    tensor: torch.Tensor
    orig_dtype: str


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("container", ["zip", "raw-pickle"])
def test_unsafe_pickle_refused_without_side_effect(tmp_path, container):
    marker = tmp_path / "pwned.txt"
    p = tmp_path / "evil.pt"
    payload = {"w": torch.zeros(2), "x": _Evil(str(marker))}
    if container == "zip":
        torch.save(payload, p)
    else:
        p.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        load_state_dict(p)
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        list_tensors(p)
    assert not marker.exists()


def test_not_a_torch_file(tmp_path):
    p = tmp_path / "train_000000.bin"  # e.g. a token shard passed by mistake
    p.write_bytes(b"\x01\x02\x03" * 100)
    with pytest.raises(CheckpointError, match=r"train_000000\.bin.*not a readable torch checkpoint"):
        load_state_dict(p)


def test_torch_file_without_tensors(tmp_path):
    p = tmp_path / "meta.pt"
    torch.save({"step": 3, "note": "no weights"}, p)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_state_dict(p)


# --------------------------------------------------------------------------- names / progress


def test_names_subset_and_unknown_names(tmp_path):
    sd = _state()
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    got = dict(iter_tensors(p, names=["codes", "tok_emb.weight"]))
    _assert_same(got, {k: sd[k] for k in ("codes", "tok_emb.weight")})
    with pytest.raises(CheckpointError, match="no tensor named.*nope"):
        iter_tensors(p, names=["tok_emb.weight", "nope"])  # raised by the call, before any read
    pt = tmp_path / "m.pt"
    torch.save(sd, pt)
    _assert_same(dict(iter_tensors(pt, names=["mask"])), {"mask": sd["mask"]})
    with pytest.raises(CheckpointError, match="no tensor named.*nope"):
        next(iter_tensors(pt, names=["nope"]))


def test_progress_off_by_default(tmp_path, capsys):
    p = tmp_path / "m.safetensors"
    save_file(_state(), str(p))
    list(iter_tensors(p))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    list(iter_tensors(p, progress=True))
    assert "tensor" in capsys.readouterr().err


def test_hf_dir_without_index_globs_shards(tmp_path):
    sd = _state()
    names = list(sd)
    save_file({n: sd[n] for n in names[:3]}, str(tmp_path / "a.safetensors"))
    save_file({n: sd[n] for n in names[3:]}, str(tmp_path / "b.safetensors"))
    assert detect_format(tmp_path) == "hf-sharded"
    _assert_same(load_state_dict(tmp_path), sd)
    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({n: sd[n] for n in names[:4]}, bins / "part1.bin")
    torch.save({n: sd[n] for n in names[4:]}, bins / "part2.bin")
    (bins / "training_args.bin").write_bytes(pickle.dumps({"x": _Evil(str(tmp_path / "pwned"))}))
    _assert_same(load_state_dict(bins), sd)
    assert not (tmp_path / "pwned").exists()


def test_qlab_artifact_bad_entries(tmp_path, monkeypatch):
    p = tmp_path / "bad.qlab"
    p.write_bytes(b"QLAB" + b"\0" * 16)
    broken = _quantized(torch.randn(4, 4))
    broken.scheme = "no-such-scheme"
    monkeypatch.setattr(readers, "read_artifact", lambda path: ({"w": broken}, {}))
    with pytest.raises(CheckpointError, match="'w' cannot be dequantized.*no-such-scheme"):
        load_state_dict(p)
    monkeypatch.setattr(readers, "read_artifact", lambda path: ({"w": [1, 2, 3]}, {}))
    with pytest.raises(CheckpointError, match="'w' is a list, not a tensor"):
        list_tensors(p)
    kept = torch.randn(3).to(torch.float16)
    monkeypatch.setattr(readers, "read_artifact", lambda path: ({"w": _Wrapped(kept, "float32")}, {}))
    assert torch.equal(load_state_dict(p)["w"], kept)  # passthrough-style wrapper: its one tensor


def test_qlab_artifact_tampered(qlab_artifact):
    p, _, _ = qlab_artifact
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.qlab.*SHA-256"):
        load_state_dict(p)


def test_bad_shard_index(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json.*not valid JSON"):
        list_tensors(tmp_path)
    idx.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        list_tensors(tmp_path)


def test_single_name_string_and_torch_dtype(tmp_path):
    sd = _state()
    p = tmp_path / "m.safetensors"
    save_file(sd, str(p))
    got = dict(iter_tensors(p, names="blocks.0.attn.c_q.weight", dtype=torch.float16))
    assert list(got) == ["blocks.0.attn.c_q.weight"]
    assert torch.equal(got["blocks.0.attn.c_q.weight"], sd["blocks.0.attn.c_q.weight"].to(torch.float16))


def test_a_refused_pickle_gets_one_short_line(tmp_path):
    import os as _os
    import pickle as _pickle  # noqa: F401 (documents what is being refused)

    class Evil:
        def __reduce__(self):
            return (_os.system, ("true",))

    torch.save({"w": Evil()}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "e.pt")
    msg = str(err.value)
    assert "refused as unsafe" in msg and "system" in msg
    assert "weights_only` set to `False`" not in msg and "\n" not in msg


def test_artifact_errors_name_the_path_once(tmp_path):
    from qlab.compress.container import encode_artifact
    from qlab.quant.rtn import quantize_rtn

    good = encode_artifact({"w": quantize_rtn(torch.randn(8, 8), 6)}, codec="brotli-11")
    (tmp_path / "t.qlab").write_bytes(good[:-5])
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "t.qlab")
    assert str(err.value).count(str(tmp_path / "t.qlab")) == 1


def test_sparse_tensors_and_odd_keys_in_a_pt_are_named(tmp_path):
    torch.save({"w": torch.eye(3).to_sparse(), "v": torch.randn(2)}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="'w' has unsupported layout"):
        load_state_dict(tmp_path / "s.pt")
    torch.save({("a", 1): torch.randn(2)}, tmp_path / "k.pt")
    with pytest.raises(CheckpointError, match="k.pt: checkpoint key"):
        load_state_dict(tmp_path / "k.pt")


@pytest.mark.parametrize(
    "header",
    [
        '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}',
        '{"a": {"dtype": "F32", "shape": [0, 18446744073709551616], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}',
        '{"a": {"dtype": "F32", "shape": [1099511627776, 1099511627776, 0], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}',
    ],
)
def test_crafted_safetensors_headers_are_named_errors(tmp_path, header):
    import struct

    raw = header.encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_state_dict(tmp_path / "x.safetensors")
