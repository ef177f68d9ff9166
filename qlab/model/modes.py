"""Running a model for measurement: eval mode for the duration (the caller's mode after),
other weights swapped in for the duration, and the GPT methods the analyses call,
reached on any module that has them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qlab.errors import ConfigError


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; its training flag restored on the way out, also
    on an exception (dropout-free GPTs score the same either way, but norms and
    third-party modules may not)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def swapped_weights(model: nn.Module, replacements: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily copy ``replacements`` into the model's parameters/buffers, then restore
    the originals (also on an exception): a quantized or averaged copy scored in place."""
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(replacements) - set(params))
    if unknown:
        raise ConfigError(f"model has no parameters named {unknown[:5]}")
    saved = {n: params[n].detach().clone() for n in replacements}
    try:
        with torch.no_grad():
            for n, v in replacements.items():
                params[n].copy_(v.to(params[n].dtype).reshape(params[n].shape))
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


# The GPT contract — what the analyses call on a model besides forward(): qlab's GPT has
# all three; a third-party module that has them works as well. Each raises ConfigError
# naming the model's type when the method is missing.
def _method(model: nn.Module, name: str) -> Callable[..., Any]:
    fn = getattr(model, name, None)
    if not callable(fn):
        raise ConfigError(f"{type(model).__name__} has no {name}(); this needs qlab's GPT contract")
    return fn


def block_outputs(model: nn.Module, idx: Tensor) -> list[Tensor]:
    """The residual stream after each executed block."""
    return list(_method(model, "block_outputs")(idx))


def final_hidden(model: nn.Module, idx: Tensor) -> Tensor:
    """The final-norm output (the LM head's input)."""
    return _method(model, "final_hidden")(idx)


def norm_and_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of a residual-stream state through the final norm and head (logit lens)."""
    return _method(model, "norm_and_logits")(x)
