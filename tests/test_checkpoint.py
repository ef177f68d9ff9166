"""Run-directory checkpoints: round trip, EMA vs raw, crash-safe commits, and bad files."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from qlab.config import get_preset
from qlab.errors import CheckpointError
from qlab.io import checkpoint as ckpt
from qlab.loaders import load_model
from qlab.model.gpt import GPT
from qlab.train.config import TrainConfig
from qlab.train.ema import EMA
from qlab.train.optim import build_optimizers

MC = get_preset("tiny").replace(
    vocab_size=64, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, rope_dims=8, loop_layers=None,
    train_seq_len=16, eval_seq_len=16,
)  # fmt: skip
TC = TrainConfig(train_seq_len=16)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: a second thread only adds contention on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained(step: int, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(MC)
    opts = build_optimizers(model, TC)
    ema = EMA(model, 0.5)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(step):
        opts.zero_grad()
        model(x, x).backward()
        opts.step()
        ema.update(model)
    return model, ema, opts


def _save(run_dir, step, seed=0, ema_on=True):
    model, ema, opts = _trained(step, seed)
    state = {
        "step": step,
        "tokens_seen": 32 * step,
        "rng_torch": torch.get_rng_state(),
        "loader": {"position": 3},
    }
    ckpt.save_checkpoint(run_dir, model, ema if ema_on else None, opts, state, MC, TC)
    return model, ema


def test_roundtrip_ema_weights_and_resume_state(tmp_path):
    model, ema = _save(tmp_path, step=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["step"] == 2 and cfg["tokens_seen"] == 64 and cfg["weights"] == "ema"
    assert cfg["model"] == MC.to_dict() and cfg["train"] == TC.to_dict() and "qlab_version" in cfg
    loaded, mc = load_model(tmp_path)
    assert mc == MC
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema.weights_like(model)[k]), k
    state = ckpt.resume_state(tmp_path)
    assert state["step"] == 2 and state["trainer"]["loader"] == {"position": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    # the raw weights differ from the shipped EMA weights after training
    assert not torch.equal(state["model"]["blocks.0.mlp.fc.weight"], loaded.blocks[0].mlp.fc.weight)
    assert set(state["optimizers"]) == {"matrix", "embed", "scalar"}
    assert not (tmp_path / ckpt.STAGING_NAME).exists()


def test_raw_weights_without_ema(tmp_path):
    model, _ = _save(tmp_path, step=1, ema_on=False)
    state, cfg = ckpt.load_checkpoint(tmp_path)
    assert cfg["weights"] == "raw"
    assert torch.equal(state["tok_emb.weight"], model.tok_emb.weight.detach())


def test_interrupted_commit_is_rolled_forward(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    _save(run, step=1)
    _save(other, step=3)
    # Simulate a kill after the staging folder was complete and optimizer.pt was moved.
    staging = run / ckpt.STAGING_NAME
    staging.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(other / name, staging / name)
    shutil.copy(other / "optimizer.pt", run / "optimizer.pt")
    assert ckpt.read_config(run)["step"] == 3  # readers prefer the complete staging folder
    assert ckpt.load_checkpoint(run)[1]["step"] == 3
    assert ckpt.resume_state(run)["step"] == 3
    assert not staging.exists() and json.loads((run / "config.json").read_text())["step"] == 3


def test_incomplete_staging_is_discarded(tmp_path):
    _save(tmp_path, step=1)
    staging = tmp_path / ckpt.STAGING_NAME
    staging.mkdir()
    (staging / "optimizer.pt").write_bytes(b"half-written")
    assert ckpt.resume_state(tmp_path)["step"] == 1
    assert not staging.exists()


def test_mismatched_files_are_detected(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    _save(run, step=1)
    _save(other, step=2)
    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    with pytest.raises(CheckpointError, match="step 2"):
        ckpt.load_checkpoint(run)
    shutil.copy(other / "optimizer.pt", run / "optimizer.pt")
    with pytest.raises(CheckpointError, match="from step 2"):
        ckpt.resume_state(run)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    _save(tmp_path, step=1)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)
    weights.write_bytes(data)
    (tmp_path / "optimizer.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        ckpt.resume_state(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt config"):
        load_model(tmp_path)


def test_unsafe_pickle_is_refused(tmp_path):
    _save(tmp_path, step=1)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "optimizer.pt").write_bytes(pickle.dumps({"format": 1, "x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="unsafe"):
        ckpt.resume_state(tmp_path)
    assert not marker.exists()


def test_config_mismatch_and_unknown_keys(tmp_path):
    _save(tmp_path, step=1)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["model_dim"] = 64
    cfg["model"]["num_heads"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path)
    cfg["model"]["model_dim"], cfg["model"]["num_heads"] = 32, 2
    cfg["model"]["bogus_field"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bogus_field"):
        load_model(tmp_path)
    del cfg["model"]["bogus_field"]
    cfg["model"]["num_layers"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown keys"):
        load_model(tmp_path)


def test_runlog_skips_torn_last_line_and_truncates(tmp_path):
    from qlab.io.runlog import RunLog, read_records, read_runlog

    log = RunLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.append({"step": step, "train_loss": 1.0 / step, "bad": float("nan"), "t": torch.tensor(2.5)})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "train_lo')  # killed mid-write
    df = read_runlog(tmp_path)
    assert df.step.tolist() == [1, 2, 3] and df.t.tolist() == [2.5] * 3 and df.bad.isna().all()
    log.truncate_after(2)
    assert [r["step"] for r in read_records(log.path)] == [1, 2]
    log.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=":2"):
        read_records(log.path)


@pytest.mark.parametrize("looping", [False, True])
def test_load_model_restores_depth_recurrence_mode(tmp_path, looping):
    mc = MC.replace(num_layers=3, loop_layers=(1,), loop_repeats=2)
    torch.manual_seed(0)
    model = GPT(mc)
    model.set_looping(looping)
    opts = build_optimizers(model, TC)
    state = {"step": 1, "tokens_seen": 32, "looping": looping}
    ckpt.save_checkpoint(tmp_path / "run", model, None, opts, state, mc, TC)
    loaded, _ = load_model(tmp_path / "run")
    assert loaded.looping is looping
    x = torch.randint(0, 64, (1, 16))
    assert torch.equal(loaded(x), model(x))


def test_weights_checksum_is_verified_on_load(tmp_path):
    import json as _json

    from qlab.config import get_preset
    from qlab.errors import CheckpointError
    from qlab.io import checkpoint as ck
    from qlab.model.gpt import GPT
    from qlab.train.config import TrainConfig

    cfg = get_preset("tiny").replace(vocab_size=64, model_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                     rope_dims=8, loop_layers=None)  # fmt: skip
    model = GPT(cfg)
    run = tmp_path / "run"

    class _Opt:
        def state_dict(self):
            return {}

    ck.save_checkpoint(run, model, None, _Opt(), {"step": 1, "tokens_seen": 0}, cfg, TrainConfig())
    assert len(_json.loads((run / "config.json").read_text())["weights_sha256"]) == 64
    load_model(run)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one flipped bit inside a tensor: still a valid safetensors file
    (run / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_model(run)
