"""The paper's 2D toy target, N(0, [[2, 1], [1, 2]]): the real data of the toy experiments.

Kept apart from the toy models and their experiment (`toy_check`), so the `data` stage runs (and
depends on) only this.
"""
from __future__ import annotations

import numpy as np
import torch

TOY_MEAN = np.zeros(2)
TOY_COV = np.array([[2.0, 1.0], [1.0, 2.0]])


def toy_points(n: int, seed: int) -> torch.Tensor:
    """n real points from the toy target (float32 (n, 2))."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.multivariate_normal(TOY_MEAN, TOY_COV, size=n).astype(np.float32))
