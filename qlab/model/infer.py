"""A ModelConfig from a state dict's names and shapes alone (third-party checkpoints).

The record's ``final_model.pt`` and its ``.int6.ptz`` carry weights but no
configuration. Shapes fix the sizes — vocab and width (``tok_emb``), depth (``blocks.N``),
heads (``q_gain``), KV width (``c_k``), MLP width (``mlp.fc``), tied head, skip gates,
BigramHash and value embeddings — and a preset supplies what shapes cannot show (loop
segment, XSA, RoPE dims, softcap). The result is checked by building the model on the
meta device and comparing every shape; a mismatch is a CheckpointError naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from qlab.config import ModelConfig, get_preset
from qlab.errors import CheckpointError, ConfigError
from qlab.model.gpt import GPT

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], name: str, where: str) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(
            f"{where}: holds no model configuration, and no tensor {name!r} to infer one from "
            "(not a checkpoint of qlab's GPT)"
        )
    return tuple(int(d) for d in shapes[name])


def model_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape for ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_model_config(
    shapes: Mapping[str, Sequence[int]], preset: str = "record", where: str = "<state dict>"
) -> ModelConfig:
    """The ModelConfig whose GPT has exactly these tensor shapes, defaults from ``preset``."""
    vocab, dim = _shape(shapes, "tok_emb.weight", where)
    layers = sorted({int(m.group(1)) for n in shapes if (m := _BLOCK.match(n))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{where}: blocks are not numbered 0..N-1 (found {layers[:8]}…)")
    heads = _shape(shapes, "blocks.0.attn.q_gain", where)[0]
    kv_dim = _shape(shapes, "blocks.0.attn.c_k.weight", where)[0]
    hidden = _shape(shapes, "blocks.0.mlp.fc.weight", where)[0]
    if heads <= 0 or dim % heads or kv_dim % (dim // heads):
        raise CheckpointError(f"{where}: width {dim}, {heads} heads and KV width {kv_dim} do not fit")
    values = sorted(int(n.split(".")[1]) for n in shapes if n.startswith("value_embeds."))
    fields = dict(
        vocab_size=vocab, model_dim=dim, num_layers=len(layers), num_heads=heads,
        num_kv_heads=kv_dim // (dim // heads), mlp_mult=hidden / dim,
        tie_embeddings="lm_head.weight" not in shapes, skip_gates="skip_gates" in shapes,
        value_embed_layers=tuple(values),
    )  # fmt: skip
    if "bigram.embed.weight" in shapes:
        buckets, bdim = _shape(shapes, "bigram.embed.weight", where)
        fields.update(bigram_buckets=buckets, bigram_dim=bdim)
    else:
        fields["bigram_buckets"] = 0
    base = get_preset(preset)
    if base.loop_layers is not None and base.loop_layers[-1] >= len(layers):
        fields["loop_layers"] = None
    try:
        config = base.replace(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: the shapes describe no valid model ({exc})") from exc
    _check_shapes(config, shapes, where)
    return config


def _check_shapes(config: ModelConfig, shapes: Mapping[str, Sequence[int]], where: str) -> None:
    want = model_shapes(config)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{where}: tensors do not match an inferred GPT: missing {missing[:4]}, extra {extra[:4]}"
        )
    for name, shape in want.items():
        if tuple(int(d) for d in shapes[name]) != shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(shapes[name])}, the inferred GPT needs {shape}"
            )
