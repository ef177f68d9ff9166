"""The training objective as one module: cross-entropy plus the configured regularizers.

One ``forward(x, y) -> (loss, logs)`` so DDP (and torch.compile) see a single forward;
the logs hold the cross-entropy and each regularizer's term, detached.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from qlab.model.gpt import GPT

__all__ = ["LossWithRegularizers"]


class LossWithRegularizers(nn.Module):
    """model + loss + regularizers in one ``forward(x, y) -> (loss, logs)``, so DDP sees one forward.

    Without regularizers this is ``model(x, y)``; with them the final hidden state is
    computed once, fed to the head for the cross-entropy and to every regularizer.
    """

    def __init__(self, model: GPT, regs: list[tuple[str, float, Any]]) -> None:
        super().__init__()
        self.model = model
        self.regs = regs

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.regs:
            loss = self.model(x, y)
            return loss, {"ce": loss.detach()}
        h = self.model.final_hidden(x)
        logits = self.model.logits_from_hidden(h)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        total, logs = ce, {"ce": ce.detach()}
        for name, weight, fn in self.regs:
            term = fn(h, self.model)
            total = total + weight * term
            logs[f"reg_{name}"] = term.detach().float()
        return total, logs
