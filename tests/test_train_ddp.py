"""DDP on CPU (gloo): 2 ranks under torchrun end identical, and equal to 1 process on the same batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlab.io import checkpoint as ckpt
from qlab.io.runlog import read_runlog

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
        MODEL_DIM="32", NUM_LAYERS="3", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="8",
    )  # fmt: skip
    for var in ("RUN_ID", "ITERATIONS", "DATA_PATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _args(data: Path, out: Path, grad_accum: int) -> list[str]:
    # Global batch: 8 sequences of 32 tokens per step, whatever the world size.
    return [
        "-m", "qlab", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
        "--iterations", "6", "--batch-tokens", "256", "--seq-len", "32", "--grad-accum", str(grad_accum),
        "--checkpoint-every", "0", "--val-every", "3", "--val-max-tokens", "513", "--log-every", "1",
        "--warmup-steps", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow  # starts three Python processes
@pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun not installed beside python")
def test_two_ranks_match_one_process(tiny_dataset, tmp_path):
    data = tiny_dataset.root
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *_args(data, ddp_out, 1)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    single = subprocess.run(
        [sys.executable, *_args(data, single_out, 2)], env=_env(), capture_output=True, text=True, timeout=300
    )
    ddp_log, _ = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, ddp_log.decode()
    assert single.returncode == 0, single.stdout + single.stderr
    assert ddp_log.decode().count("checkpoint:") == 1  # rank 0 alone prints the summary

    final = read_runlog(ddp_out).query("kind == 'final'").iloc[0]
    assert final.world_size == 2 and final.ranks_identical  # bit-identical weights on both ranks
    a, b = ckpt.resume_state(ddp_out), ckpt.resume_state(single_out)
    assert a["trainer"]["world_size"] == 2 and b["trainer"]["world_size"] == 1
    assert a["trainer"]["loader"] == b["trainer"]["loader"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=0, msg=k)
        torch.testing.assert_close(a["ema"][k], b["ema"][k], atol=1e-5, rtol=0, msg=k)
    la = read_runlog(ddp_out).query("kind == 'train'").train_loss.to_numpy()
    lb = read_runlog(single_out).query("kind == 'train'").train_loss.to_numpy()
    assert la == pytest.approx(lb, abs=1e-4)
    va = read_runlog(ddp_out).query("kind == 'val'").val_bpb.to_numpy()
    vb = read_runlog(single_out).query("kind == 'val'").val_bpb.to_numpy()
    assert len(va) == 1 and va == pytest.approx(vb, abs=1e-5)
