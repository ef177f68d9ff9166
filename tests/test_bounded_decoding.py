"""Every decoder bounded before it allocates, and the remaining tracebacks turned into
QlabErrors at the depth where the bad value enters. Memory is measured in a child process
(its own peak RSS), so an earlier peak of the test process cannot hide growth."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import time
import zipfile

import numpy as np
import pytest
import torch
from memprobe import peak_growth_mib
from safetensors.torch import save_file

from qlab.compress import container as C
from qlab.compress.ans import _put_varint, ans_encode
from qlab.compress.codecs import get_codec
from qlab.errors import ArtifactError, CheckpointError, ConfigError, QlabError, QuantError
from qlab.loaders.readers import load_state_dict
from qlab.quant.tensor import QuantizedTensor, dequantize


def _qt(codes: torch.Tensor, scale: torch.Tensor) -> QuantizedTensor:
    shape = tuple(codes.shape)
    return QuantizedTensor(codes=codes, scale=scale, zero=None, bits=6, shape=shape, scheme="int",
                           group_size=None, codebook=None, meta={})  # fmt: skip


def _with_header(data: bytes, edit) -> bytes:
    """The artifact ``data`` with its header JSON edited, every hash recomputed."""
    head, end = C._read_header_v2(data, "x")
    header = json.loads(head)
    edit(header)
    raw = json.dumps(header).encode()
    return C._PREFIX.pack(C.MAGIC, C.VERSION, 0, len(raw), hashlib.sha256(raw).digest()) + raw + data[end:]


# ------------------------------------------------------------------ 8. the ans byte codec


def _lying_ans_stream(n: int) -> bytes:
    """A valid order-0 stream of 3 bytes whose prelude claims ``n`` symbols."""
    stream = bytearray(ans_encode(np.array([1, 2, 3], np.uint8)))
    assert stream[6:8] == bytes([1, 3])  # MAGIC(4) version dtype, ndim 1, then the length 3
    out = bytearray(stream[:7])
    _put_varint(out, n)
    return bytes(out + stream[8:])


def test_the_ans_byte_codec_refuses_a_declared_size_over_the_limit():
    stream = _lying_ans_stream(10**9)
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match="declares more than"):
        get_codec("ans").decompress(stream, max_output=1000)
    assert time.perf_counter() - t0 < 1.0


def test_a_qlab_file_whose_ans_payload_lies_costs_nothing(tmp_path):
    """The byte codec ``ans`` as a whole-payload codec: its stream claims 10⁹ bytes where
    the header says 4."""
    path = tmp_path / "a.qlab"
    stream = _lying_ans_stream(10**9)
    data = C.encode_artifact({"w": torch.zeros(1, dtype=torch.int32)}, codec="raw", shuffle=False)

    def lie(h):
        h.update(codec="ans", payload_length=len(stream), payload_sha256=hashlib.sha256(stream).hexdigest())

    head, end = C._read_header_v2(data, "x")
    path.write_bytes(_with_header(data[:end] + stream, lie))
    assert peak_growth_mib(C.read_artifact, path, expect=QlabError, match="declares more than") < 64


def test_an_empty_shape_with_data_after_it_is_corrupt():
    from qlab.compress.symbols import decode_symbols, encode_symbols

    stream = bytearray(encode_symbols(np.array([[1, 2], [3, 4]], np.int8)))
    stream[7] = 0  # rows: 2 -> 0
    with pytest.raises(ArtifactError, match="after an empty shape"):
        decode_symbols(bytes(stream))


# ------------------------------------------------------------------ 9. symbol-coded artifacts


def test_symbol_decoding_costs_under_ten_bytes_per_symbol():
    from qlab.compress.symbols import decode_symbols, encode_symbols

    codes = np.zeros((1, 1 << 23), np.int8)
    codes[0, -1] = 1
    stream = encode_symbols(codes, groups=1, references=False)
    growth = peak_growth_mib(decode_symbols, stream)
    assert growth < 10 * codes.size / 2**20, f"{growth:.0f} MiB for {codes.size:,} symbols"


def test_a_symbol_stream_past_the_work_bound_is_refused_before_decoding():
    from qlab.compress.symbols import MAX_DECODE_WORK_BYTES, decode_symbols, encode_symbols

    n = MAX_DECODE_WORK_BYTES // 9 + 1024
    stream = bytearray(encode_symbols(np.array([[0, 1]], np.int8)))
    # rewrite the shape: [1, 2] -> [1, n] (one varint byte for 1, then the column count)
    assert stream[6:9] == bytes([2, 1, 2])
    cols = bytearray()
    _put_varint(cols, n)
    forged = bytes(stream[:8]) + bytes(cols) + bytes(stream[9:])
    with pytest.raises(ArtifactError, match="GiB to decode"):
        decode_symbols(forged)


def test_header_arrays_must_add_up_to_the_raw_length_before_decoding(tmp_path):
    data = C.encode_artifact({"w": torch.zeros(8)}, codec="brotli-11")
    forged = _with_header(data, lambda h: h.update(raw_length=C.MAX_RAW_BYTES))
    with pytest.raises(ArtifactError, match="'raw_length' says"):
        C.decode_artifact(forged)


# ------------------------------------------------------------------ 10. zip .ptz


def _deflate_bomb(nbytes: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
        z.writestr("archive/data/1", b"\0" * nbytes)
    return out.getvalue()


def test_a_deflated_zip_ptz_is_bounded_like_a_brotli_one(tmp_path):
    path = tmp_path / "bomb.ptz"
    path.write_bytes(_deflate_bomb(300 << 20))
    assert path.stat().st_size < 2 << 20
    growth = peak_growth_mib(load_state_dict, path, expect=QlabError, match="over the")
    assert growth < 64


# ------------------------------------------------------------------ 11. many tiny entries


def test_many_tiny_safetensors_entries_are_refused(tmp_path):
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(70_000)}
    raw = json.dumps(header).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="over qlab's limit"):
        load_state_dict(path)


def test_many_tiny_qlab_entries_are_refused():
    data = C.encode_artifact({"w": torch.zeros(2)}, codec="raw")
    many = [{"name": f"t{i}", "kind": "tensor", "arrays": {}} for i in range(70_000)]
    with pytest.raises(ArtifactError, match="over qlab's limit"):
        C.decode_artifact(_with_header(data, lambda h: h.update(tensors=many)))


# ------------------------------------------------------------------ 13. tracebacks at the entry depth


@pytest.mark.parametrize(
    "tree",
    [
        {"w": [1, 2], "m": {"a": "gptq (int6)"}},
        {"w": {"a.q": torch.zeros(2, 2)}, "m": {1: "gptq (int6)"}},
        {
            "w": {"a.q": torch.zeros(2, 2), "a.scale": torch.zeros(2, dtype=torch.bool)},
            "m": {"a": "gptq (int6)"},
        },
        {"quantized": [torch.zeros(2)], "scales": {}, "passthrough": {}},
        {"quantized": {"a": torch.zeros(2, 2)}, "scales": {}, "passthrough": {}},
        {"quantized": {"a": 3}, "scales": {"a": torch.ones(2)}, "passthrough": {}},
        {"quantized": {}, "scales": {}, "passthrough": {"b": "text"}},
        {"quantized": {}, "scales": {}, "passthrough": {"b": torch.ones(2)}, "passthrough_orig_dtypes": [1]},
    ],
)
def test_ptz_trees_with_hostile_types_are_qlab_errors(tmp_path, tree):
    from qlab.compress.ptz import ptz_bytes

    path = tmp_path / "t.ptz"
    path.write_bytes(ptz_bytes(tree, codec="brotli-5"))
    with pytest.raises(QlabError):
        load_state_dict(path)


def test_a_qlab_header_whose_extra_is_not_an_object_is_refused():
    from qlab.loaders import load_quantized

    data = C.encode_artifact({"w": torch.zeros(2)}, codec="raw")
    with pytest.raises(ArtifactError, match="'extra' must be an object"):
        C.decode_artifact(_with_header(data, lambda h: h.update(extra=[1, 2])))
    assert callable(load_quantized)


def test_a_one_dimensional_per_row_scale_is_a_quant_error():
    q = _qt(torch.zeros(4, 6, dtype=torch.int8), torch.ones(4))
    with pytest.raises(QuantError, match="does not broadcast"):
        dequantize(q)
    with pytest.raises(QuantError):
        q.validate()


@pytest.mark.parametrize("codec", ["brotli-11", "ans"])
def test_zero_size_codes_round_trip(codec):
    q = _qt(torch.zeros(0, 5, dtype=torch.int8), torch.ones(0, 1))
    out, _ = C.decode_artifact(C.encode_artifact({"q": q}, codec=codec))
    assert tuple(out["q"].codes.shape) == (0, 5)


def test_deeply_nested_json_is_a_qlab_error_everywhere(tmp_path, tiny_dataset):
    import shutil

    from qlab.analysis.matrix.spec import load_spec
    from qlab.data.dataset import open_dataset
    from qlab.io.checkpoint import read_config

    deep = "[" * 100_000 + "]" * 100_000
    data = C.encode_artifact({"w": torch.zeros(2)}, codec="raw")
    head, end = C._read_header_v2(data, "x")
    raw = deep.encode()
    forged = C._PREFIX.pack(C.MAGIC, C.VERSION, 0, len(raw), hashlib.sha256(raw).digest()) + raw + data[end:]
    with pytest.raises(ArtifactError, match="nested too deeply"):
        C.decode_artifact(forged)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(deep)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_config(run)
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset.root, ds)
    (ds / "meta.json").write_text(deep)
    with pytest.raises(QlabError, match="nested too deeply"):
        open_dataset(ds)
    for suffix, text in ((".yaml", deep), (".toml", "a = " + deep)):
        spec = tmp_path / f"m{suffix}"
        spec.write_text(text)
        with pytest.raises(ConfigError):
            load_spec(spec)


def test_gptq_of_an_empty_matrix_is_a_quant_error():
    from qlab.quant.gptq import gptq_quantize

    with pytest.raises(QuantError, match="non-empty"):
        gptq_quantize(torch.zeros(16, 0), torch.zeros(0, 0), bits=6)


def test_entropies_of_empty_and_extreme_codes():
    from qlab.compress.entropy import order0_entropy, order1_entropy, row_entropy, symbol_entropies

    empty = np.zeros((0, 5), np.int64)
    assert row_entropy(empty) == 0.0 and order0_entropy(empty) == 0.0
    with pytest.raises(QuantError):
        order1_entropy(empty)
    extreme = np.array([[2**62, -(2**62)], [1, 2]], np.int64)
    assert order0_entropy(extreme) == pytest.approx(2.0)  # four distinct values, once each
    assert row_entropy(extreme) == pytest.approx(1.0)
    assert order1_entropy(extreme) == pytest.approx(0.0)
    assert symbol_entropies(extreme)[0] == pytest.approx(2.0)


def test_predicting_an_empty_tree():
    from qlab.compress.predict import predict_compressed_bytes, skeleton_bytes

    assert predict_compressed_bytes({}) == skeleton_bytes({})


def test_loop_variables_are_bounded_before_a_range_is_built():
    from qlab.config import get_preset
    from qlab.train.config import model_env_overrides

    with pytest.raises(ConfigError, match="LOOP_END"):
        model_env_overrides({"NUM_LOOPS": "1", "LOOP_END": "99999999999999999999"}, get_preset("tiny"))


@pytest.mark.parametrize(
    "env, field",
    [({"SEED": "-1"}, "seed"), ({"WARMDOWN_ITERS": "0", "ITERATIONS": "0"}, "ITERATIONS")],
)
def test_train_environments_that_were_tracebacks(env, field):
    from qlab.train.config import resolve_configs

    with pytest.raises(ConfigError, match=field):
        resolve_configs("tiny", env=env)


def test_safetensors_seed_still_loads(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3)}, str(path))
    assert torch.equal(load_state_dict(path)["a"], torch.ones(3))


def test_a_stream_ending_in_a_zero_word_is_corrupt():
    """Found by the symbol-layout fuzzing: the rANS coder refuses such words itself."""
    from qlab.compress.ans import ans_decode
    from qlab.compress.symbols import decode_symbols, encode_symbols

    for encode, decode in ((encode_symbols, decode_symbols), (ans_encode, ans_decode)):
        stream = bytearray(encode(np.array([[0, 1, 2, 1], [1, 0, 2, 2]], np.int8)))
        stream[-4:] = bytes(4)  # the last u32 word
        with pytest.raises(ArtifactError, match="does not decode|undecoded|disagree"):
            decode(bytes(stream))


def test_a_null_train_table_in_a_spec_is_the_defaults_or_an_error_never_a_traceback(tmp_path):
    from qlab.analysis.matrix.spec import load_spec

    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"name": "m", "bases": {"a": {"preset": "tiny", "train": None}}}))
    assert load_spec(path).bases[0].train == {}
