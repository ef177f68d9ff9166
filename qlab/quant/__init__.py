"""Quantizers, clip rules, GPTQ and per-tensor policies (see docs/design.md)."""

from qlab.quant.clip import CLIP_RULES, compute_clip, get_clip_rule
from qlab.quant.gptq import gptq_quantize, gptq_quantize_many
from qlab.quant.hessian import collect_hessians
from qlab.quant.policy import (
    Passthrough,
    Policy,
    Rule,
    TensorSpec,
    dequantize_state_dict,
    get_policy,
    policy_from_dict,
    quantize_state_dict,
)
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import QuantizedTensor, dequantize

__all__ = [
    "CLIP_RULES",
    "Passthrough",
    "Policy",
    "QuantizedTensor",
    "Rule",
    "TensorSpec",
    "collect_hessians",
    "compute_clip",
    "dequantize",
    "dequantize_state_dict",
    "get_clip_rule",
    "get_policy",
    "gptq_quantize",
    "gptq_quantize_many",
    "policy_from_dict",
    "quantize_rtn",
    "quantize_state_dict",
]
