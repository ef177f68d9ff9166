"""EvalContext: one assembly of model, data, validation, calibration and Hessians."""

from __future__ import annotations

import json

import pytest
import torch

from qlab.errors import ConfigError
from qlab.eval import context as context_mod
from qlab.eval.bpb import evaluate_bpb
from qlab.eval.context import EvalContext, resolve_dataset, validation_inputs
from qlab.eval.pipeline import run_pipeline
from qlab.quant.model_quant import calibration_batches, model_hessians
from qlab.quant.policy import Policy, Rule, TensorSpec
from tests.test_pipeline import CFG, _model, _policy


def _all_matrices_policy() -> Policy:
    g = TensorSpec(method="gptq", bits=5, clip="sdclip", clip_params={"k": 10.0})
    return Policy("all5", [Rule("*", g, ndim=2, min_numel=100), Rule("*", TensorSpec(method="passthrough"))])


def _mlp_policy() -> Policy:
    g = TensorSpec(method="gptq", bits=6, clip="sdclip", clip_params={"k": 12.85})
    return Policy("mlp6", [Rule("*mlp*", g, ndim=2), Rule("*", TensorSpec(method="passthrough"))])


def test_validation_and_float_score_match_a_hand_assembly(tiny_dataset):
    ctx = EvalContext.open(_model(), tiny_dataset)
    assert ctx.seq_len == CFG.eval_seq_len and ctx.calib_seq_len == CFG.train_seq_len
    val, tables = validation_inputs(tiny_dataset, CFG.eval_seq_len, CFG.vocab_size)
    assert torch.equal(ctx.val_tokens, val)
    hand = evaluate_bpb(ctx.model, val, tables, seq_len=CFG.eval_seq_len, max_tokens=400)
    got = ctx.evaluate(max_tokens=400)
    assert got.val_bpb == hand.val_bpb and got.tokens == hand.tokens
    assert ctx.evaluate(max_tokens=400, progress=True) is got  # scored once per setting
    assert ctx.evaluate(max_tokens=200) is not got


def test_hessians_are_collected_once_and_shared_between_policies(tiny_dataset, monkeypatch):
    ctx = EvalContext.open(_model(), tiny_dataset)
    calls = []
    real = context_mod.model_hessians

    def counted(model, policy, *args, **kwargs):
        calls.append(policy.name)
        return real(model, policy, *args, **kwargs)

    monkeypatch.setattr(context_mod, "model_hessians", counted)
    wide = ctx.hessians(_all_matrices_policy(), 2, 2)
    narrow = ctx.hessians(_mlp_policy(), 2, 2)  # a subset of the tensors already collected
    assert calls == ["all5"] and narrow and set(narrow) < set(wide)
    batches = calibration_batches(tiny_dataset, 2, seq_len=CFG.train_seq_len, batch_seqs=2)
    direct = model_hessians(_model(), _mlp_policy(), batches)
    assert set(direct) == set(narrow)
    for name, h in direct.items():
        torch.testing.assert_close(narrow[name], h, rtol=0, atol=0)
    ctx.hessians(_policy(), 3, 2)  # another calibration set is collected afresh
    assert calls == ["all5", "tiny6"]


def test_a_pipeline_on_one_context_scores_the_float_model_once(tiny_dataset, monkeypatch):
    ctx = EvalContext.open(_model(), tiny_dataset)
    kw = dict(calib_batches=2, calib_batch_seqs=2, stride=None, max_eval_tokens=400)
    first = run_pipeline(ctx, _policy(), **kw).row.iloc[0]
    alone = run_pipeline(_model(), _policy(), tiny_dataset, **kw).row.iloc[0]
    assert first["pre_quant_bpb"] == alone["pre_quant_bpb"]
    assert first["quantized_bpb"] == alone["quantized_bpb"]
    scored = len(ctx._scores)
    second = run_pipeline(ctx, _all_matrices_policy(), **kw).row.iloc[0]
    assert len(ctx._scores) == scored and second["pre_quant_bpb"] == first["pre_quant_bpb"]
    with pytest.raises(ConfigError, match="brings its own"):
        run_pipeline(ctx, _policy(), tiny_dataset, **kw)


def test_a_run_opens_with_its_own_dataset_while_it_exists(tiny_dataset, tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(run / "model.safetensors"))
    config = {"model": CFG.to_dict(), "train": {"data": str(tiny_dataset.root)}, "step": 0}
    (run / "config.json").write_text(json.dumps(config))
    assert EvalContext.open(run).data.root == tiny_dataset.root
    config["train"]["data"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    assert context_mod.recorded_dataset(run) is None  # then the embedded corpus, as `qlab eval` does


def test_the_embedded_corpus_needs_a_vocabulary():
    with pytest.raises(ConfigError, match="vocabulary size"):
        resolve_dataset(None, None)


def test_a_model_without_a_config_needs_a_seq_len(tiny_dataset):
    net = torch.nn.Sequential(torch.nn.Embedding(8, 4))
    with pytest.raises(ConfigError, match="seq_len"):
        EvalContext.open(net, tiny_dataset)
    assert EvalContext.open(net, tiny_dataset, 16).seq_len == 16
