"""`qlab train --resume` after a SIGKILL reaches bit-identical weights to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlab.io import checkpoint as ckpt
from qlab.io.runlog import read_runlog

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 16


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
        MODEL_DIM="32", NUM_LAYERS="3", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="8",
    )  # fmt: skip
    for var in ("RUN_ID", "ITERATIONS", "DATA_PATH", "RANK", "WORLD_SIZE"):
        env.pop(var, None)
    return env


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    # tiny preset: step-based schedule (no wallclock cap), so warm-down and the loop switch
    # at 50 % both happen between the kill and the end.
    return [
        sys.executable, "-m", "qlab", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
        "--iterations", str(ITERATIONS), "--batch-tokens", "128", "--seq-len", "32", "--grad-accum", "2",
        "--checkpoint-every", "2", "--val-every", "0", "--val-max-tokens", "257", "--log-every", "1",
        "--warmup-steps", "0", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def _checkpoint_step(run: Path) -> int:
    try:
        return ckpt.read_config(run)["step"]
    except Exception:
        return -1


@pytest.mark.slow  # three CLI processes (~15 s idle, longer on a busy machine)
def test_sigkill_then_resume_is_bit_exact(tiny_dataset, tmp_path):
    data = tiny_dataset.root
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.Popen(_cmd(data, full), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(
        _cmd(data, killed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while _checkpoint_step(killed) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    out, _ = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, f"run ended before it was killed:\n{out.decode()}"
    at_kill = _checkpoint_step(killed)
    assert 2 <= at_kill < ITERATIONS, at_kill

    resumed = subprocess.run(
        [sys.executable, "-m", "qlab", "train", "--out", str(killed), "--resume", "--no-progress"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "checkpoint:" in resumed.stdout and "val bpb:" in resumed.stdout
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out.decode()

    a, b = ckpt.resume_state(full), ckpt.resume_state(killed)
    assert a["step"] == b["step"] == ITERATIONS
    assert a["trainer"]["looping"] and b["trainer"]["looping"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"raw weight {k} differs after resume"
        assert torch.equal(a["ema"][k], b["ema"][k]), f"EMA weight {k} differs after resume"
    wa, wb = ckpt.load_checkpoint(full)[0], ckpt.load_checkpoint(killed)[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The metrics of the killed run were cut back to its checkpoint, so no step is logged twice.
    steps = read_runlog(killed).query("kind == 'train'").step.tolist()
    assert steps == list(range(1, ITERATIONS + 1))
    final_a = json.loads((full / "config.json").read_text())
    assert final_a["tokens_seen"] == ITERATIONS * 128
