"""One training loop for base training and self-training: the family's own loss, Adam(W), EMA.

It can hand out its complete state and resume from it; storing that state is the caller's business.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from models.errors import NonFiniteError

Progress = Callable[[int, int, dict], None]  # (step, total, figures) -> None
Snapshot = Callable[[dict], None]  # (the loop's complete state, see `fit`) -> None


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


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None if all are finite."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def fit(model: nn.Module, loss_fn, data: torch.Tensor, labels: torch.Tensor | None, *, steps: int,
        batch_size: int, lr: float, seed: int, ema_decay: float = 0.0, optimizer: str = "adam",
        label_dropout: float = 0.0, null_label: int = -1, progress: Progress | None = None,
        log_every: int = 0, snapshot_every: int = 0, on_snapshot: Snapshot | None = None,
        resume: dict | None = None) -> nn.Module:
    """Train `model` in place on uint8 images (N, C, H, W) or float points (N, D); return the EMA copy (or the model if no EMA).

    With labels, a `label_dropout` share of them is replaced by `null_label` so that the model also
    learns the unconditional score that classifier-free guidance needs.

    Every `snapshot_every` steps (except the last) `on_snapshot` gets the loop's complete state; its
    tensors are live views, to be written before it returns. Passed back as `resume`, that state
    continues the run exactly as if it had never stopped: the same batches, noise, dropout masks, EMA,
    optimizer moments and logged losses. A state with non-finite weights is never handed out.
    """
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # batch order and label dropout
    noise_gen = torch.Generator(device=dev).manual_seed(seed)  # the loss's noise
    torch.manual_seed(seed)  # dropout
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = opt_cls(model.parameters(), lr=lr)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay > 0 else None
    n = data.shape[0]
    order, cursor = torch.randperm(n, generator=gen), 0
    start, running = 0, 0.0  # running: the loss summed since the last progress line
    if resume is not None:
        start, cursor, running = resume["step"], resume["cursor"], resume["running"]
        order = resume["order"]
        model.load_state_dict(resume["model"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        _set_rng(resume["rng"], gen, noise_gen, dev)
    log_every = log_every or max(steps // 10, 1)
    model.train()
    t0 = time.monotonic()
    for step in range(start + 1, steps + 1):
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
            speed = (step - start) * batch_size / (time.monotonic() - t0)
            progress(step, steps, {"loss": running / k, "images_per_s": speed})
            running = 0.0
        if on_snapshot and snapshot_every and step % snapshot_every == 0 and step < steps:
            state = {"step": step, "cursor": cursor, "running": running, "order": order,
                     "rng": _get_rng(gen, noise_gen, dev), "model": model.state_dict(),
                     "ema": {} if ema is None else ema.state_dict(), "optimizer": opt.state_dict()}
            for part in ("model", "ema"):
                if bad := non_finite(state[part]):
                    raise NonFiniteError(f"weights became NaN/inf at step {step} ({part} tensor `{bad}`); "
                                         "lower the learning rate")
            on_snapshot(state)
    model.eval()
    return ema if ema is not None else model


def _get_rng(gen: torch.Generator, noise_gen: torch.Generator, dev: torch.device) -> dict[str, torch.Tensor]:
    # The global generator drives dropout (and CUDA's, on a GPU): without it a resumed run draws other masks.
    rng = {"batch": gen.get_state(), "noise": noise_gen.get_state(), "torch": torch.get_rng_state()}
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    return rng


def _set_rng(rng: dict[str, torch.Tensor], gen: torch.Generator, noise_gen: torch.Generator, dev: torch.device) -> None:
    gen.set_state(rng["batch"])
    noise_gen.set_state(rng["noise"])
    torch.set_rng_state(rng["torch"])
    if dev.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], dev)
