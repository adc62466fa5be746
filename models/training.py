"""One training loop for base training and self-training: the family's own loss, Adam(W), EMA."""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from models.errors import NonFiniteError

Progress = Callable[[int, int, dict], None]  # (step, total, figures) -> None


def to_unit_range(data: torch.Tensor) -> torch.Tensor:
    return data.to(torch.float32) / 127.5 - 1


def to_model_space(data: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1]; float data (points of a vector family) are used as they are."""
    return to_unit_range(data) if data.dtype == torch.uint8 else data.to(torch.float32)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def fit(model: nn.Module, loss_fn, data: torch.Tensor, labels: torch.Tensor | None, *, steps: int,
        batch_size: int, lr: float, seed: int, ema_decay: float = 0.0, optimizer: str = "adam",
        label_dropout: float = 0.0, null_label: int = -1, progress: Progress | None = None,
        log_every: int = 0) -> nn.Module:
    """Train `model` in place on uint8 images (N, C, H, W) or float points (N, D); return the EMA copy (or the model if no EMA).

    With labels, a `label_dropout` share of them is replaced by `null_label` so that the model also
    learns the unconditional score that classifier-free guidance needs.
    """
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # batch order
    noise_gen = torch.Generator(device=dev).manual_seed(seed)  # the loss's noise
    torch.manual_seed(seed)  # dropout
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = opt_cls(model.parameters(), lr=lr)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay > 0 else None
    n = data.shape[0]
    order, cursor = torch.randperm(n, generator=gen), 0
    log_every = log_every or max(steps // 10, 1)
    model.train()
    t0, running = time.monotonic(), 0.0
    for step in range(1, steps + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        batch = to_model_space(data[idx]).to(dev)
        lab = None
        if labels is not None:
            lab = labels[idx].clone()
            lab[torch.rand(len(idx), generator=gen) < label_dropout] = null_label
            lab = lab.to(dev)
        loss = loss_fn(model, batch, lab, noise_gen)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema_update(ema, model, ema_decay)
        running += loss.item()
        if progress and (step % log_every == 0 or step == steps):
            k = step % log_every or log_every
            progress(step, steps, {"loss": running / k, "images_per_s": step * batch_size / (time.monotonic() - t0)})
            running = 0.0
    model.eval()
    return ema if ema is not None else model
