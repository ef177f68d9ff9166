"""The evaluation stages of the records, in pipeline order, and what each stage costs.

The records' logs name each stage (``pre-quantization post-ema``, ``quantized``,
``quantized_sliding_window``, a TTT stage); :func:`attribute_stages` turns one run's
stage bpbs into the columns every qlab table uses: the quantization tax (quantized −
pre-quant, or − pre-quant TTT), the sliding-window gain and the TTT gain, in mBPB, negative
= better. The pipeline (:mod:`qlab.eval.pipeline`) and the papers' data
(:mod:`qlab.analysis.papers`) share this one definition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["STAGES", "STAGE_LABELS", "TTT_STAGES", "ATTRIBUTION_COLUMNS", "attribute_stages"]

#: Evaluation stages in pipeline order, named as the records' logs name them.
STAGES = (
    "pre-quantization post-ema",
    "post-prequant-ttt",
    "quantized",
    "quantized_sliding_window",
    "quantized_ttt_phased",
    "legal_ttt",
)
STAGE_LABELS = {
    "pre-quantization post-ema": "pre-quant",
    "post-prequant-ttt": "after pre-quant TTT",
    "quantized": "quantized",
    "quantized_sliding_window": "sliding window",
    "quantized_ttt_phased": "phased TTT",
    "legal_ttt": "score-first TTT",
}
TTT_STAGES = ("quantized_ttt_phased", "legal_ttt")


#: The columns :func:`attribute_stages` returns, in table order.
ATTRIBUTION_COLUMNS = (
    "pre_quant_bpb",
    "prequant_ttt_bpb",
    "quantized_bpb",
    "sliding_bpb",
    "ttt_bpb",
    "quant_tax_mbpb",
    "sliding_gain_mbpb",
    "ttt_gain_mbpb",
    "final_bpb",
)


def attribute_stages(by: Mapping[str, float]) -> dict:
    """Stage bpbs keyed by record stage names → the attribution columns (deltas in mBPB)."""
    nan = math.nan
    pre, pqt = by.get(STAGES[0], nan), by.get("post-prequant-ttt", nan)
    quant, slide = by.get("quantized", nan), by.get("quantized_sliding_window", nan)
    ttt = next((by[s] for s in TTT_STAGES if s in by), nan)
    float_ref = pqt if not math.isnan(pqt) else pre
    ttt_ref = slide if not math.isnan(slide) else quant
    final = next((by[s] for s in reversed(STAGES) if s in by), nan)
    return {
        "pre_quant_bpb": pre,
        "prequant_ttt_bpb": pqt,
        "quantized_bpb": quant,
        "sliding_bpb": slide,
        "ttt_bpb": ttt,
        "quant_tax_mbpb": 1e3 * (quant - float_ref),
        "sliding_gain_mbpb": 1e3 * (slide - quant),
        "ttt_gain_mbpb": 1e3 * (ttt - ttt_ref),
        "final_bpb": final,
    }
