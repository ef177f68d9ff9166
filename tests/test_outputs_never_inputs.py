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
