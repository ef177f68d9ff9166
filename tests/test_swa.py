"""SWA running mean and EMA/SWA blending, checked by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlab.errors import CheckpointError, ConfigError, NumericalError
from qlab.train.swa import SWA, blend


def _state(w: float, step: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([w, 2 * w]), "step": torch.tensor(step)}


def test_running_mean_only_on_due_warmdown_steps():
    swa = SWA(every=10)
    taken = [
        swa.maybe_update(_state(float(step), step), step, in_warmdown=step >= 20) for step in range(0, 41, 5)
    ]
    # due steps: 20, 30, 40 → mean of w = (20 + 30 + 40)/3 = 30
    assert taken == [False, False, False, False, True, False, True, False, True]
    assert swa.count == 3
    avg = swa.average()
    torch.testing.assert_close(avg["w"], torch.tensor([30.0, 60.0]))
    assert avg["step"].item() == 40 and avg["step"].dtype == torch.int64  # non-float: latest value


def test_mean_is_float32_and_exact_for_many_bf16_snapshots():
    swa = SWA(every=1)
    values = [1.0, 2.0, 4.0, 8.0, 16.0]
    for v in values:
        swa.update({"w": torch.full((3,), v, dtype=torch.bfloat16)})
    avg = swa.average()["w"]
    assert avg.dtype == torch.float32
    torch.testing.assert_close(avg, torch.full((3,), sum(values) / len(values)))


def test_update_from_module_and_state_roundtrip():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    swa = SWA(every=1)
    first = {k: v.clone() for k, v in lin.state_dict().items()}
    swa.update(lin)
    with torch.no_grad():
        lin.weight.add_(1.0)
    swa.update(lin)
    torch.testing.assert_close(swa.average()["weight"], first["weight"] + 0.5)
    other = SWA()
    other.load_state_dict(swa.state_dict())
    assert other.count == 2 and other.every == 1
    torch.testing.assert_close(other.average()["bias"], swa.average()["bias"])
    with pytest.raises(CheckpointError, match="keys"):
        swa.update({"weight": torch.zeros(2, 3)})


def test_blend_by_hand():
    ema = {"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16), "n": torch.tensor(7)}
    swa = {"w": torch.tensor([3.0, 7.0]), "n": torch.tensor(7)}
    out = blend(ema, swa, alpha=0.25)  # 0.25·ema + 0.75·swa
    assert out["w"].dtype == torch.bfloat16
    torch.testing.assert_close(out["w"].float(), torch.tensor([2.5, 6.0]))
    assert out["n"].item() == 7
    torch.testing.assert_close(blend(ema, swa)["w"].float(), torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(blend(ema, swa, 1.0)["w"], ema["w"])


def test_errors():
    with pytest.raises(ConfigError, match="every"):
        SWA(every=0)
    with pytest.raises(ConfigError, match="no snapshot"):
        SWA().average()
    a = {"w": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="keys"):
        blend(a, {"v": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="shape"):
        blend(a, {"w": torch.zeros(3)})
    with pytest.raises(NumericalError, match="w"):
        blend(a, {"w": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ConfigError, match="alpha"):
        blend(a, a, alpha=1.5)
    with pytest.raises(CheckpointError, match="non-float"):
        blend({"n": torch.tensor(1)}, {"n": torch.tensor(2)})
    with pytest.raises(CheckpointError, match="count"):
        SWA().load_state_dict({"count": 2, "mean": {}})
