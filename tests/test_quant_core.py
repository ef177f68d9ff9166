"""RTN, clip rules, the QuantizedTensor container, policies and Hessian collection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qlab.errors import ConfigError, DataError, QuantError
from qlab.quant.clip import (
    CLIP_RULES,
    get_clip_rule,
    hessian_sdclip,
    mse_grid,
    quantile_search,
    sdclip,
)
from qlab.quant.gptq import gptq_quantize_many
from qlab.quant.hessian import collect_hessians
from qlab.quant.policy import (
    Passthrough,
    TensorSpec,
    dequantize_state_dict,
    get_policy,
    policy_from_dict,
    quantize_state_dict,
)
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import QuantizedTensor, dequantize

# ---------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("gran", ["tensor", "row", "group"])
def test_rtn_symmetric_error_bound(bits, gran):
    w = torch.randn(12, 70, generator=torch.Generator().manual_seed(bits))
    q = quantize_rtn(w, bits, granularity=gran, group_size=16 if gran == "group" else None)
    R = 2 ** (bits - 1) - 1
    assert int(q.codes.abs().max()) <= R and q.codes.dtype == torch.int8
    s = q.scale.float()
    s_full = s.expand(12, 70) if gran != "group" else s.repeat_interleave(16, dim=1)[:, :70]
    # absmax clip: every weight is inside the range, so the error is at most s/2
    assert torch.all((w - dequantize(q)).abs() <= s_full / 2 + 1e-7)


def test_rtn_group_shapes_and_manual_values():
    w = torch.arange(1.0, 11.0).reshape(1, 10)  # groups of 4: [1..4] [5..8] [9, 10]
    q = quantize_rtn(w, 4, granularity="group", group_size=4, scale_dtype=torch.float32)
    assert q.scale.shape == (1, 3) and q.group_size == 4
    assert torch.allclose(q.scale[0], torch.tensor([4 / 7, 8 / 7, 10 / 7]))
    assert torch.equal(q.codes[0, :4], torch.round(torch.tensor([1.0, 2, 3, 4]) / (4 / 7)).to(torch.int8))
    q1 = quantize_rtn(torch.randn(50), 4, granularity="group", group_size=16)
    assert q1.scale.shape == (4,) and dequantize(q1).shape == (50,)


def test_rtn_asymmetric_covers_min_and_max():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(6, 40, generator=g) * 3 - 0.5  # mostly positive: asymmetric pays off
    for bits in (3, 8):
        q = quantize_rtn(w, bits, symmetric=False)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
        deq = dequantize(q)
        s = q.scale.float()
        assert torch.all((w - deq).abs() <= s / 2 + 1e-6)
        exact = (w.amax(1) - w.amin(1).clamp(max=0)) / (2**bits - 1)
        assert torch.all(s[:, 0] >= exact) and torch.all(s[:, 0] <= exact * (1 + 2**-10))
    sym = quantize_rtn(w, 3)
    asym = quantize_rtn(w, 3, symmetric=False)
    assert (w - dequantize(asym)).pow(2).mean() < (w - dequantize(sym)).pow(2).mean()


def test_rtn_zero_and_constant_rows():
    w = torch.zeros(3, 8)
    w[1] = 0.7
    w[2] = torch.randn(8)
    for clip in ("absmax", "sdclip"):
        q = quantize_rtn(w, 4, clip=clip)
        assert torch.all(q.scale.float() > 0)
        assert torch.all(q.codes[0] == 0)
        assert torch.allclose(dequantize(q)[1], w[1], atol=1e-3)  # constant row: absmax fallback


def test_rtn_rejects_bad_input():
    w = torch.randn(4, 4)
    w[0, 0] = float("inf")
    with pytest.raises(QuantError, match="blocks.1.mlp.fc.weight.*Inf"):
        quantize_rtn(w, 4, name="blocks.1.mlp.fc.weight")
    for bits in (1, 9):
        with pytest.raises(QuantError, match="bits"):
            quantize_rtn(torch.randn(4, 4), bits)
    with pytest.raises(QuantError, match="1-D or 2-D"):
        quantize_rtn(torch.randn(2, 2, 2), 4)
    with pytest.raises(QuantError, match="precomputed clip"):
        quantize_rtn(torch.randn(4, 4), 4, clip=torch.ones(3))
    with pytest.raises(ConfigError, match="group_size"):
        quantize_rtn(torch.randn(4, 4), 4, granularity="group")


def test_codebook_dequantize_and_unknown_scheme():
    q = QuantizedTensor(
        codes=torch.tensor([[0, 2], [1, 1]], dtype=torch.int8),
        scale=torch.tensor([[2.0], [0.5]]),
        zero=None,
        bits=2,
        shape=(2, 2),
        scheme="codebook",
        codebook=torch.tensor([-1.0, 0.0, 3.0]),
    )
    assert torch.equal(dequantize(q), torch.tensor([[-2.0, 6.0], [0.0, 0.0]]))
    q.scheme = "nope"
    with pytest.raises(QuantError, match="unknown quantization scheme"):
        dequantize(q)


# ---------------------------------------------------------------- clip rules


def test_sdclip_scale_is_k_std_over_R_population():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, -0.5, -0.5]])
    # population std by hand: row 0 mean 0.5, squared deviations 0.25+6.25+6.25+0.25 = 13 → sqrt(13/4)
    std = torch.tensor([math.sqrt(13 / 4), 0.5])
    q = quantize_rtn(w, 6, clip="sdclip", clip_params={"k": 12.85}, scale_dtype=torch.float32)
    assert torch.allclose(q.scale[:, 0], 12.85 * std / 31, rtol=1e-6)
    assert torch.allclose(sdclip(w, 6, k=2.0)[:, 0], 2.0 * std)


def _mse(w, c, bits):
    R = 2 ** (bits - 1) - 1
    s = c / R
    return ((w - torch.clamp(torch.round(w / s), -R, R) * s) ** 2).mean(dim=1)


def test_quantile_search_picks_lowest_mse():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 3000, generator=g)
    w[:, :3] *= 3  # a few mild outliers: clipping them beats stretching the grid
    ps = (0.9, 0.99, 0.999, 1.0)
    a = w.abs().double().numpy()  # independent quantiles: numpy, float64, linear interpolation
    cands = [torch.from_numpy(np.quantile(a, p, axis=1, keepdims=True)).float() for p in ps]
    per_row = torch.stack([_mse(w, c, 4) for c in cands])  # (P, rows)
    best = int(per_row.sum(1).argmin())
    assert torch.allclose(quantile_search(w, 4, ps=ps), cands[best], rtol=1e-6)
    row_best = per_row.argmin(0)
    want = torch.stack([cands[int(row_best[i])][i] for i in range(16)])
    assert torch.allclose(quantile_search(w, 4, ps=ps, per="row"), want, rtol=1e-6)
    assert best != len(ps) - 1  # the test is meaningful: absmax (p = 1) is not the winner


def test_mse_grid_never_worse_than_absmax():
    w = torch.randn(8, 500, generator=torch.Generator().manual_seed(5))
    c = mse_grid(w, 3, n=11)
    assert torch.all(_mse(w, c, 3) <= _mse(w, w.abs().amax(1, keepdim=True), 3) + 1e-9)


def test_hessian_sdclip_formula_by_hand():
    w = torch.tensor([[1.0, -1.0, 2.0], [0.0, 3.0, -3.0]])
    hdiag = torch.tensor([1.0, 2.0, 3.0])
    d = hdiag + 0.01 * 2.0  # damped: + 0.01·mean(hdiag)
    r = torch.stack([(w[i].abs() * d).mean() / d.mean() for i in range(2)])
    r = r / r.mean()
    sigma = torch.tensor([w[0].std(correction=0), w[1].std(correction=0)])
    want = 5.0 * sigma * (1 + 0.175 * (r - 1))
    assert torch.allclose(hessian_sdclip(w, 6, k=5.0, hdiag=hdiag)[:, 0], want, rtol=1e-6)
    with pytest.raises(QuantError, match="hdiag"):
        hessian_sdclip(w, 6)


def test_clip_registry():
    assert set(CLIP_RULES) >= {"absmax", "sdclip", "quantile_search", "mse_grid", "hessian_sdclip"}
    assert get_clip_rule("sdclip") is sdclip
    with pytest.raises(ConfigError, match="absmax"):
        get_clip_rule("bogus")


# ---------------------------------------------------------------- policies


def _record_like_state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "tok_emb.weight": torch.randn(512, 160, generator=g) * 0.02,
        "blocks.3.mlp.fc.weight": torch.randn(512, 160, generator=g) * 0.02,
        "blocks.3.attn.c_q.weight": torch.randn(160, 512, generator=g) * 0.02,
        "blocks.3.attn_scale": torch.ones(160),
        "blocks.3.resid_mix": torch.randn(2, 160, generator=g),
        "skip_gates": torch.zeros(4, 160),
        "small_matrix": torch.randn(64, 64, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
    }


def test_record_policy_matching():
    sd = _record_like_state_dict()
    pol = get_policy("record")
    emb = pol.spec_for("tok_emb.weight", sd["tok_emb.weight"])
    assert (emb.method, emb.bits, emb.clip_params["k"]) == ("gptq", 8, 20.0)
    fc = pol.spec_for("blocks.3.mlp.fc.weight", sd["blocks.3.mlp.fc.weight"])
    assert (fc.method, fc.bits, fc.clip, fc.clip_params["k"]) == ("gptq", 6, "sdclip", 12.85)
    for n in ("blocks.3.attn_scale", "skip_gates", "small_matrix"):
        s = pol.spec_for(n, sd[n])
        assert (s.method, s.passthrough_dtype) == ("passthrough", "fp16")
    assert pol.spec_for("step", sd["step"]).passthrough_dtype == "raw"
    pa = get_policy("record_pathA")
    assert pa.spec_for("blocks.3.attn_scale", sd["blocks.3.attn_scale"]).passthrough_dtype == "int8_tensor"
    assert pa.spec_for("skip_gates", sd["skip_gates"]).passthrough_dtype == "int8_tensor"
    assert pa.spec_for("small_matrix", sd["small_matrix"]).passthrough_dtype == "int8_row"
    pc = get_policy("per_category")
    assert pc.spec_for("blocks.3.mlp.fc.weight", sd["blocks.3.mlp.fc.weight"]).clip_params["k"] == 12.0
    assert pc.spec_for("blocks.3.attn.c_q.weight", sd["blocks.3.attn.c_q.weight"]).clip_params["k"] == 13.0
    with pytest.raises(ConfigError, match="record"):
        get_policy("nope")


def test_record_small_policy_on_tiny_model():
    from qlab.config import get_preset
    from qlab.model.gpt import GPT

    torch.manual_seed(0)
    sd = GPT(get_preset("tiny")).state_dict()
    pol, record = get_policy("record_small"), get_policy("record")
    assert pol.name == "record_small"
    blocks = [n for n, t in sd.items() if n.startswith("blocks.") and n.endswith(".weight") and t.dim() == 2]
    assert len(blocks) == 6 * get_preset("tiny").num_layers  # c_q, c_k, c_v, proj, fc, mlp.proj per layer
    for n in blocks:
        s = pol.spec_for(n, sd[n])
        assert (s.method, s.bits, s.clip, dict(s.clip_params)) == (
            "gptq",
            6,
            "sdclip",
            {"k": 12.85, "correction": 1},
        ), n
        assert record.spec_for(n, sd[n]).method == "passthrough", n  # the reason record_small exists
    emb = pol.spec_for("tok_emb.weight", sd["tok_emb.weight"])
    assert (emb.method, emb.bits, dict(emb.clip_params)) == ("gptq", 8, {"k": 20.0, "correction": 1})
    for n, t in sd.items():  # everything else: the record's fp16 passthrough, threshold 4,096
        if n not in blocks and n != "tok_emb.weight":
            assert pol.spec_for(n, t).method == "passthrough", n
    g = torch.Generator().manual_seed(1)
    edge = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, 65, generator=g)}
    assert [pol.spec_for(n, t).method for n, t in edge.items()] == ["passthrough", "gptq"]
    qsd = quantize_state_dict(sd, pol)  # no Hessians: RTN fallback with the same bits
    assert all(qsd[n].bits == 6 for n in blocks) and qsd["tok_emb.weight"].bits == 8


def test_quantize_state_dict_round_trip():
    sd = _record_like_state_dict()
    X = torch.randn(300, 160)
    hess = {"blocks.3.mlp.fc.weight": X.T @ X / 300}  # tok_emb and c_q have none → RTN fallback
    for name in ("record", "record_pathA", "rtn_int8"):
        qsd = quantize_state_dict(sd, get_policy(name), hessians=hess)
        assert list(qsd) == list(sd)
        back = dequantize_state_dict(qsd)
        for n, t in sd.items():
            assert back[n].dtype == t.dtype and back[n].shape == t.shape
            if t.is_floating_point():  # int6 k=12.85: step ≈ 0.41σ → RMS error ≈ 0.12σ (GPTQ a bit more)
                rel = (back[n] - t).pow(2).mean().sqrt() / t.pow(2).mean().sqrt().clamp_min(1e-12)
                assert rel < 0.25, (name, n, float(rel))
        assert torch.equal(back["step"], sd["step"])
    qsd = quantize_state_dict(sd, get_policy("record"), hessians=hess)
    assert qsd["blocks.3.mlp.fc.weight"].meta["method"] == "gptq"
    assert "no Hessian" in qsd["tok_emb.weight"].meta["note"]
    assert isinstance(qsd["skip_gates"], Passthrough) and qsd["skip_gates"].data.dtype == torch.float16


@pytest.mark.filterwarnings("ignore::qlab.quant.policy.NothingQuantizedWarning")  # small on purpose
def test_pathA_int8_passthrough_values():
    t = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    qsd = quantize_state_dict({"m": t, "blocks.0.attn_scale": t[0]}, get_policy("record_pathA"))
    assert qsd["m"].kind == "int8_row" and qsd["m"].scale.dtype == torch.float16
    assert torch.allclose(qsd["m"].scale.float(), torch.tensor([1 / 127, 2 / 127]).half().float())
    ctl = qsd["blocks.0.attn_scale"]
    assert ctl.kind == "int8_tensor" and ctl.scale.dtype == torch.float32
    assert torch.allclose(ctl.dequantize(), t[0], atol=1 / 254)


def test_policy_from_dict():
    pol = policy_from_dict(
        {
            "name": "mine",
            "rules": [
                {"pattern": "re:blocks\\.\\d+\\.mlp\\..*", "spec": {"method": "rtn", "bits": 4}},
                {"pattern": "*", "spec": {"method": "passthrough"}},
            ],
        }
    )
    assert pol.spec_for("blocks.10.mlp.fc.weight", torch.randn(4, 4)).bits == 4
    assert pol.spec_for("tok_emb.weight", torch.randn(4, 4)).method == "passthrough"
    assert policy_from_dict(pol.to_dict()).to_dict() == pol.to_dict()
    with pytest.raises(ConfigError, match="method"):
        policy_from_dict({"rules": [{"pattern": "*", "spec": {"method": "magic"}}]})
    listy = policy_from_dict(  # list-valued clip params (as JSON gives them) must work in GPTQ groups
        {
            "rules": [
                {
                    "pattern": "*",
                    "spec": {"bits": 4, "clip": "quantile_search", "clip_params": {"ps": [0.99, 1]}},
                }
            ]
        }
    )
    x = torch.randn(100, 32)
    q = quantize_state_dict({"a": torch.randn(8, 32)}, listy, hessians={"a": x.T @ x})
    assert q["a"].meta["method"] == "gptq" and q["a"].meta["clip"] == "quantile_search"
    with pytest.raises(ConfigError, match="unknown keys"):
        policy_from_dict({"rules": [{"pattern": "*", "spec": {}, "colour": 1}]})


# ---------------------------------------------------------------- Hessians


class _Toy(nn.Module):
    """Embedding → two Linears → tied head, with a final_hidden like the GPT contract."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)
        self.tiny = nn.Linear(16, 2, bias=False)

    def final_hidden(self, idx):
        x = self.tok_emb(idx)
        h = self.down(torch.relu(self.up(x))) + x + self.tiny(x).sum(-1, keepdim=True)
        return h / (h.norm(dim=-1, keepdim=True) + 1)

    def forward(self, idx):
        return self.final_hidden(idx) @ self.tok_emb.weight.T


def test_collect_hessians_matches_manual_xtx():
    torch.manual_seed(0)
    m = _Toy()
    batches = [torch.randint(0, 50, (3, 7)) for _ in range(4)]
    hs = collect_hessians(m, batches, min_numel=40)
    assert set(hs) == {"tok_emb.weight", "up.weight", "down.weight"}  # tiny has 32 ≤ 40 weights
    want_up = torch.zeros(16, 16)
    want_down = torch.zeros(32, 32)
    want_emb = torch.zeros(16, 16)
    with torch.no_grad():
        for b in batches:
            x = m.tok_emb(b).reshape(-1, 16)
            want_up += x.T @ x
            a = torch.relu(m.up(x))
            want_down += a.T @ a
            f = m.final_hidden(b).reshape(-1, 16)
            want_emb += f.T @ f
    for key, want in (("up.weight", want_up), ("down.weight", want_down), ("tok_emb.weight", want_emb)):
        assert torch.allclose(hs[key], want / 4, rtol=1e-5, atol=1e-6), key
    assert "tok_emb.weight" not in collect_hessians(m, batches, min_numel=40, include_tied_embedding=False)
    with pytest.raises(DataError, match="no calibration batches"):
        collect_hessians(m, [], min_numel=40)


def _tiny_gpt_hessians(seed: int, batch: int, n_batches: int):
    """A tiny GPT, its calibration batches and their Hessians (every Linear)."""
    from qlab.config import get_preset
    from qlab.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(get_preset("tiny")).eval()
    idx = [torch.randint(0, model.config.vocab_size, (batch, 32)) for _ in range(n_batches)]
    return model, idx, collect_hessians(model, idx, min_numel=0)


def test_collect_hessians_on_tiny_gpt():
    model, idx, hs = _tiny_gpt_hessians(0, 1, 2)
    d = model.config.model_dim
    assert hs["tok_emb.weight"].shape == (d, d)
    assert hs["blocks.0.attn.c_q.weight"].shape == (d, d)
    fc = model.blocks[0].mlp.fc.weight
    assert hs["blocks.0.mlp.proj.weight"].shape == (fc.shape[0], fc.shape[0])
    f = model.final_hidden(idx[0]).reshape(-1, d).detach()
    f2 = model.final_hidden(idx[1]).reshape(-1, d).detach()
    assert torch.allclose(hs["tok_emb.weight"], (f.T @ f + f2.T @ f2) / 2, rtol=1e-4, atol=1e-5)
    qsd = quantize_state_dict(model.state_dict(), get_policy("record"), hessians=hs)
    assert qsd["tok_emb.weight"].meta["method"] == "gptq"


def test_sdclip_bessel_option_matches_the_records_row_std():
    # The record computes s = k·W.std(dim=1)/R: torch's default Bessel std. By hand:
    w = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, -0.5, 0.5, -0.5]])
    mean = w.mean(dim=1, keepdim=True)
    bessel = (((w - mean) ** 2).sum(dim=1) / (w.shape[1] - 1)).sqrt()
    population = (((w - mean) ** 2).sum(dim=1) / w.shape[1]).sqrt()
    assert torch.allclose(sdclip(w, 6, k=3.0, correction=1)[:, 0], 3.0 * bessel)
    assert torch.allclose(sdclip(w, 6, k=3.0)[:, 0], 3.0 * population)
    for name in ("record", "record_small", "record_pathA", "per_category"):
        spec = get_policy(name).spec_for("blocks.0.mlp.fc.weight", torch.zeros(2048, 512))
        assert spec.clip_params["correction"] == 1, name


@pytest.mark.parametrize("k", [0.0, -1.0, float("nan"), float("inf"), "12", True, None])
def test_sdclip_rejects_a_bad_clip_width(k):
    with pytest.raises(ConfigError, match="clip width k"):
        sdclip(torch.randn(3, 8), 6, k=k)
    with pytest.raises(ConfigError, match="clip width k"):
        hessian_sdclip(torch.randn(3, 8), 6, k=k, hdiag=torch.ones(8))


def test_layers_reading_one_input_share_one_hessian():
    model, idx, hs = _tiny_gpt_hessians(1, 2, 3)
    attn = model.blocks[0].attn
    seen: dict[str, torch.Tensor] = {}

    def own_xtx(name: str):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen[name] = seen.get(name, 0) + x.T @ x

        return hook

    mods = {"c_q": attn.c_q, "c_k": attn.c_k, "c_v": attn.c_v, "proj": attn.proj}
    hooks = [mod.register_forward_pre_hook(own_xtx(n)) for n, mod in mods.items()]
    with torch.no_grad():
        for b in idx:
            model(b)
    for h in hooks:
        h.remove()
    q, k, v, proj = (hs[f"blocks.0.attn.{n}.weight"] for n in ("c_q", "c_k", "c_v", "proj"))
    assert k is q and v is q and proj is not q  # one tensor per distinct input
    assert torch.allclose(q, seen["c_k"] / 3, rtol=1e-5, atol=1e-6)  # c_k's own X^T X, had it been computed
    assert torch.allclose(proj, seen["proj"] / 3, rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["c_q"], seen["c_v"])


def test_gptq_factorises_a_shared_hessian_once(monkeypatch):
    import qlab.quant.gptq as gptq

    calls = []
    real = gptq.upper_cholesky_of_inverse
    monkeypatch.setattr(
        gptq, "upper_cholesky_of_inverse", lambda h, *a, **k: calls.append(h.shape) or real(h, *a, **k)
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 64, generator=g)
    h_in, h_other = x.T @ x, (x * 2).T @ x
    ws = {n: torch.randn(r, 64, generator=g) for n, r in (("q", 64), ("k", 32), ("v", 32), ("o", 64))}
    out = gptq_quantize_many(ws, {"q": h_in, "k": h_in, "v": h_in, "o": h_other})
    assert len(calls) == 2  # one per distinct Hessian, not per matrix
    for n in ws:  # sharing changes nothing: each matrix alone gives the same codes
        hs = {"q": h_in, "k": h_in.clone(), "v": h_in.clone(), "o": h_other}
        assert torch.equal(out[n].codes, gptq_quantize_many({n: ws[n]}, {n: hs[n]})[n].codes)


def test_gptq_arithmetic_is_part_of_the_policy():
    from qlab.quant.policy import with_gptq_arithmetic

    fast = with_gptq_arithmetic(get_policy("record_small"), "fast")
    assert {r.spec.gptq_arithmetic for r in fast.rules if r.spec.method == "gptq"} == {"fast"}
    assert all(r.spec == s.spec for r, s in zip(fast.rules, get_policy("record_small").rules, strict=True)
               if r.spec.method != "gptq")  # fmt: skip
    assert policy_from_dict(fast.to_dict()).rules == fast.rules  # round-trips through JSON
    with pytest.raises(ConfigError, match="gptq_arithmetic"):
        TensorSpec(gptq_arithmetic="quick")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g)
    sd = {"blocks.0.mlp.fc.weight": torch.randn(64, 96, generator=g)}
    out = quantize_state_dict(sd, fast, hessians={"blocks.0.mlp.fc.weight": x.T @ x})
    assert out["blocks.0.mlp.fc.weight"].meta["arithmetic"] == "fast"
