"""Classifier-free guidance, shared by the samplers of conditional families."""
from __future__ import annotations

from typing import Callable

import torch


def guided(predict: Callable[[torch.Tensor | None], torch.Tensor], labels: torch.Tensor | None,
           guidance: float) -> torch.Tensor:
    """uncond + guidance * (cond - uncond) in float64; one network call when there is nothing to guide.

    `predict(labels)` evaluates the network at the current state; None means "no label".
    """
    if labels is None or guidance == 1.0:
        return predict(labels).to(torch.float64)
    cond = predict(labels).to(torch.float64)
    uncond = predict(None).to(torch.float64)
    return uncond + guidance * (cond - uncond)
