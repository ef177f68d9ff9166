"""The pre-quant → quantized → sliding (→ TTT) row: stage values, deltas, bytes, paper columns."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from qlab.analysis.papers import pipeline_attribution
from qlab.config import ModelConfig
from qlab.data import build_byte_tables, load_tokenizer, load_validation_tokens
from qlab.errors import CheckpointError
from qlab.eval.bpb import evaluate_bpb
from qlab.eval.context import resolve_model
from qlab.eval.pipeline import COLUMNS, run_pipeline
from qlab.eval.ttt import TTTConfig
from qlab.loaders import load_quantized
from qlab.model.gpt import GPT
from qlab.quant.policy import Policy, Rule, TensorSpec

CFG = ModelConfig(
    vocab_size=512, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
    loop_layers=None, train_seq_len=32, eval_seq_len=32,
)  # fmt: skip
EVAL_TOKENS = 800


def _model() -> GPT:
    torch.manual_seed(0)
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.numel() > 1024:
                p.normal_(0.0, 0.05)
    return model


def _policy() -> Policy:
    g = TensorSpec(method="gptq", bits=6, clip="sdclip", clip_params={"k": 12.85})
    return Policy(
        "tiny6", [Rule("*", g, ndim=2, min_numel=1025), Rule("*", TensorSpec(method="passthrough"))]
    )


@pytest.fixture(scope="module")
def result(tiny_dataset):
    ttt = TTTConfig(seq_len=32, stride=16, chunk_tokens=400, lr=0.0, epochs=1, batch_seqs=8)
    return run_pipeline(
        _model(), _policy(), tiny_dataset, calib_batches=2, calib_batch_seqs=2, stride=16,
        max_eval_tokens=EVAL_TOKENS, ttt=ttt, code_bytes=1000,
    )  # fmt: skip


def test_row_columns_and_deltas(result):
    row = result.row
    assert list(row.columns) == COLUMNS and len(row) == 1
    r = row.iloc[0]
    for col in ("pre_quant_bpb", "quantized_bpb", "sliding_bpb", "ttt_bpb"):
        assert math.isfinite(r[col]) and r[col] > 0, col
    assert r["quant_tax_mbpb"] == pytest.approx(1e3 * (r["quantized_bpb"] - r["pre_quant_bpb"]))
    assert r["sliding_gain_mbpb"] == pytest.approx(1e3 * (r["sliding_bpb"] - r["quantized_bpb"]))
    assert r["ttt_gain_mbpb"] == pytest.approx(1e3 * (r["ttt_bpb"] - r["sliding_bpb"]))
    assert r["final_bpb"] == r["ttt_bpb"]
    assert r["pre_quant_bpb"] != r["quantized_bpb"]
    assert r["hessians_used"] and r["calib_batches"] == 2
    assert r["artifact_bytes"] == len(result.artifact) + 1000
    assert r["predicted_bytes"] == pytest.approx(r["artifact_bytes"], rel=0.05)
    assert r["fits_cap"] and r["headroom_bytes"] == 16_000_000 - r["artifact_bytes"]
    assert all(r[c] >= 0 for c in COLUMNS if c.startswith("time_"))


def test_stages_match_independent_evaluations(result, tiny_dataset, tmp_path):
    val = load_validation_tokens(tiny_dataset.val_files, 32, vocab_size=tiny_dataset.vocab_size)
    tables = build_byte_tables(load_tokenizer(tiny_dataset.tokenizer_path), 512)
    r = result.row.iloc[0]
    pre = evaluate_bpb(_model(), val, tables, seq_len=32, max_tokens=EVAL_TOKENS)
    assert r["pre_quant_bpb"] == pytest.approx(pre.val_bpb, rel=1e-12)
    # the quantized stage is the model the artifact holds
    path = tmp_path / "row.qlab"
    path.write_bytes(result.artifact)
    loaded = load_quantized(path).model
    quant = evaluate_bpb(loaded, val, tables, seq_len=32, max_tokens=EVAL_TOKENS)
    slide = evaluate_bpb(loaded, val, tables, seq_len=32, max_tokens=EVAL_TOKENS, stride=16)
    assert r["quantized_bpb"] == pytest.approx(quant.val_bpb, rel=1e-12)
    assert r["sliding_bpb"] == pytest.approx(slide.val_bpb, rel=1e-12)
    # TTT at lr 0 scores exactly like the sliding evaluation it wraps
    assert r["ttt_bpb"] == pytest.approx(r["sliding_bpb"], rel=1e-9)


def test_row_concatenates_with_the_papers(result):
    paper = pipeline_attribution()
    both = pd.concat([paper, result.row], ignore_index=True)
    shared = ["pre_quant_bpb", "quantized_bpb", "sliding_bpb", "ttt_bpb", "quant_tax_mbpb",
              "sliding_gain_mbpb", "ttt_gain_mbpb", "final_bpb"]  # fmt: skip
    assert set(shared) <= set(paper.columns) & set(result.row.columns)
    assert both[shared].dtypes.map(lambda d: d.kind == "f").all()
    assert both["source"].iloc[-1] == "qlab"


def test_resolve_model_refuses_configless_checkpoints(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="no model configuration"):
        resolve_model(path)


def test_quantize_checkpoint_is_the_pipeline_plus_its_byte_table(tiny_dataset, tmp_path):
    from qlab.eval.quantize import quantize_checkpoint

    res = quantize_checkpoint(_model(), _policy(), tiny_dataset, calib_batches=2, calib_batch_seqs=2,
                              stride=16, max_eval_tokens=EVAL_TOKENS, codec="ans")  # fmt: skip
    row = res.row.iloc[0]
    assert res.save(tmp_path / "m.qlab").stat().st_size == row["artifact_bytes"] == len(res.artifact)
    assert row["hessians_used"] and res.solved is None and res.policy.name == "tiny6"
    # with the symbol coder the byte table is measured, and its artifact row is the file
    assert not res.budget.attrs["predicted"]
    assert res.budget.attrs["artifact_bytes"] == row["artifact_bytes"]
    same = run_pipeline(_model(), _policy(), tiny_dataset, calib_batches=2, calib_batch_seqs=2, stride=16,
                        max_eval_tokens=EVAL_TOKENS, codec="ans", extra={"source": "GPT"})  # fmt: skip
    assert same.artifact == res.artifact and same.row["quantized_bpb"].iloc[0] == row["quantized_bpb"]


def test_attribution_columns_name_what_attribute_stages_returns():
    from qlab.eval.stages import ATTRIBUTION_COLUMNS, STAGES, attribute_stages

    assert tuple(attribute_stages({STAGES[0]: 1.0, "quantized": 1.002})) == ATTRIBUTION_COLUMNS
