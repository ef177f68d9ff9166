"""Running a model for measurement: eval mode for the duration (the caller's mode after),
and the GPT methods the analyses call, reached on any module that has them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

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
