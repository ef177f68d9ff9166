"""Outputs never overwrite inputs; --force only replaces an earlier output; stale temp files go."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import save_file

from qlab.cli import main
from qlab.errors import ConfigError
from qlab.io.atomic import atomic_write_bytes, check_output


def test_entropy_refuses_to_write_over_its_input(tmp_path, capsys):
    w = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(w))
    before = w.read_bytes()
    for flag in ("--json", "--csv"):
        assert main(["entropy", str(w), flag, str(w), "--force"]) == 2
        assert "overwrite the input" in capsys.readouterr().err
    assert w.read_bytes() == before
    out = tmp_path / "r.json"
    assert main(["entropy", str(w), "--json", str(out)]) == 0
    assert main(["entropy", str(w), "--json", str(out)]) == 2  # exists, no --force
    assert main(["entropy", str(w), "--json", str(out), "--force"]) == 0


def test_outputs_beside_a_run_but_never_its_weights(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "config.json").write_text("{}")
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(ConfigError, match="overwrite the input"):
            check_output(run / name, [run], force=True)
    check_output(run / "model.qlab", [run])  # a new output beside the inputs is fine
    (run / "model.qlab").write_bytes(b"old artifact")
    check_output(run / "model.qlab", [run], force=True)  # replacing an earlier output is fine


def test_stale_temp_files_are_swept_on_the_next_write(tmp_path):
    stale, fresh = tmp_path / ".x.abc.tmp", tmp_path / ".y.def.tmp"
    stale.write_bytes(b"killed")
    fresh.write_bytes(b"in flight")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    atomic_write_bytes(tmp_path / "z", b"data")
    assert not stale.exists() and fresh.exists()


def test_shard_index_cannot_point_outside_its_folder(tmp_path):
    import json

    from qlab.errors import CheckpointError
    from qlab.loaders.readers import load_state_dict

    outside = tmp_path / "secret.safetensors"
    save_file({"a": torch.zeros(2)}, str(outside))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for shard in (str(outside), "../secret.safetensors"):
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            load_state_dict(ckpt)


def test_a_null_matrix_base_is_an_error_not_the_defaults(tmp_path):
    from qlab.analysis.matrix.spec import spec_from_dict

    with pytest.raises(ConfigError, match="bases.a is empty"):
        spec_from_dict({"bases": {"a": None}})


def test_internal_errors_exit_3(monkeypatch, capsys):
    import qlab.cli.info as info

    def boom(args):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(info, "run", boom)
    from qlab.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["info", "--list"])
    args.func = boom
    monkeypatch.setattr(
        "qlab.cli.build_parser", lambda only=None: type("P", (), {"parse_args": lambda self, a: args})()
    )
    assert main(["info", "--list"]) == 3
    assert "internal error" in capsys.readouterr().err


def test_entropy_accepts_the_policy_files_quantize_accepts(tmp_path, capsys):
    import json

    w = tmp_path / "w.safetensors"
    save_file({"blocks.0.mlp.fc.weight": torch.randn(64, 64)}, str(w))
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"name": "mine", "rules": [{"pattern": "*", "ndim": 2,
                               "spec": {"method": "rtn", "bits": 5, "clip": "absmax"}}]}))  # fmt: skip
    assert main(["entropy", str(w), "--policy", str(pol)]) == 0
    assert "policy mine" in capsys.readouterr().out


def test_quantize_never_replaces_the_runs_weights(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "config.json").write_text("{}")
    assert main(["quantize", str(run), "--out", str(run / "model.safetensors"), "--force"]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(
    "field, value", [("num_layers", 10_000_000), ("model_dim", 10**9), ("vocab_size", 2**40)]
)
def test_hostile_model_sizes_are_refused_before_allocation(field, value):
    from qlab.config import ModelConfig, get_preset

    d = get_preset("tiny").to_dict() | {field: value}
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=field if field != "model_dim" else "model_dim|heads"):
        ModelConfig.from_dict(d)
    assert time.perf_counter() - t0 < 1.0


def test_files_are_written_with_the_users_umask(tmp_path):
    import stat

    from qlab.io.atomic import _UMASK, atomic_write_bytes

    path = atomic_write_bytes(tmp_path / "table.csv", b"a,b\n")
    plain = tmp_path / "plain.csv"
    plain.write_bytes(b"a,b\n")  # what open() gives under the same umask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~_UMASK
