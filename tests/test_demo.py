"""The demo end to end at a few training steps (the matrix step has its own tests)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from qlab.demo import run_demo
from qlab.errors import ConfigError


@pytest.mark.slow
def test_demo_runs_every_step_and_reports(tmp_path):
    state = run_demo(tmp_path / "demo", iterations=3, progress=False, skip=("matrix", "figures"))
    n = state.numbers
    assert n["vocab_size"] == 1024 and n["train_tokens"] > 500_000
    assert n["train_steps"] == 3
    # untrained-ish model: bpb is finite and the baselines are ordered as they must be
    assert n["unigram_bpb"] < n["uniform_bpb"]
    assert 0 < n["val_bpb"] < 2 * n["uniform_bpb"]
    assert n["artifact_bytes"] == (tmp_path / "demo" / "model.qlab").stat().st_size
    for key in ("artifact", "pipeline", "budget", "entropy", "sweep", "fingerprint", "report"):
        assert state.written[key].exists(), key
    row = pd.read_csv(state.written["pipeline"]).iloc[0]
    assert row["quant_tax_mbpb"] == pytest.approx(
        1000 * (row["quantized_bpb"] - row["pre_quant_bpb"]), abs=1e-6
    )
    report = json.loads(state.written["report"].read_text())
    assert set(report["timings_s"]) == {
        "dataset",
        "train",
        "evaluate",
        "quantize",
        "entropy",
        "sweep",
        "fingerprint",
    }

    again = run_demo(
        tmp_path / "demo",
        iterations=3,
        progress=False,
        skip=("matrix", "quantize", "entropy", "sweep", "fingerprint", "figures"),
    )
    assert again.numbers["train_reused"] is True
    assert again.numbers["val_bpb"] == pytest.approx(n["val_bpb"], rel=1e-12)


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown demo step"):
        run_demo(tmp_path, skip=("nope",))


def test_quick_demo_prints_each_number_as_it_is_measured(tmp_path, capsys):
    from qlab.cli import main

    out = tmp_path / "quick"
    assert main(["demo", "--quick", "--iterations", "3", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "[demo] tiny model trained" in text and "3 steps" in text
    assert "[demo] validation bpb measured" in text and "val_bpb " in text
    assert "quantized val_bpb" in text and "rate-distortion sweep" not in text
    assert (out / "model.qlab").is_file() and not (out / "sweep.csv").exists()
    # without bars (--quiet, a log file) every step announces itself before it runs
    assert "[demo] step 1/5: dataset …" in text and "[demo] step 5/5: entropy …" in text
    assert "torch thread(s)" in text


def test_demo_threads_follow_the_request_the_environment_then_the_idle_cores(monkeypatch):
    from qlab.demo import demo_threads

    assert demo_threads(3, env={}) == 3
    assert demo_threads(None, env={"OMP_NUM_THREADS": "2"}) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (3.2, 0.0, 0.0))
    assert demo_threads(None, env={}) == 1  # 4 cores, 3 busy
    monkeypatch.setattr("os.getloadavg", lambda: (0.8, 0.0, 0.0))
    assert demo_threads(None, env={}) == 4  # the tail of a finished command is not a busy core
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 0.0, 0.0))
    assert demo_threads(None, env={}) == 1  # never below one
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.0, 0.0))
    assert demo_threads(None, env={}) == 4
    with pytest.raises(ConfigError):
        demo_threads(0, env={})
