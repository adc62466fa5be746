"""One training loop for base training and self-training: the family's own loss, Adam(W), EMA.

It can hand out its complete state and resume from it; storing that state is the caller's business.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from models.errors import NonFiniteError

Progress = Callable[[int, int, dict], None]  # (step, total, figures) -> None
Snapshot = Callable[[dict], None]  # (the loop's complete state, see `fit`) -> None


def _alone(x):
    return x


def _gather_alone(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class Parallel:
    """How one process's loop shares a global batch with others; how the processes were started and talk is
    the caller's business. The default is one process on its own."""
    rank: int = 0
    world: int = 1
    # The loss as a module (forward = loss) -> one whose backward averages the gradients over the processes (DDP).
    wrap: Callable[[nn.Module], nn.Module] = _alone
    mean: Callable[[torch.Tensor], torch.Tensor] = _alone  # a tensor averaged over the processes
    gather: Callable[[Any], list[Any]] = _gather_alone  # every process's object, in rank order


class _Objective(nn.Module):
    """The loss as a module, so that a wrapper (DDP) sees every use of the model's weights, whichever of the
    model's methods the family's loss calls (e.g. the toy AR's `factors`) and however many times."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        return self.loss_fn(self.model, batch, labels, generator)


def stream_seed(seed: int, stream: int) -> int:
    """The seed of loss-noise stream `stream`; stream 0 is seeded by `seed` itself (one stream: the
    loop as it always was)."""
    if stream == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"neon-noise-stream/{seed}/{stream}".encode()).digest()[:8], "big") >> 1


class _Stream:
    """One chunk's randomness inside the loss: its noise generator and the global RNG that dropout draws
    from, swapped in while the chunk's forward pass runs and carried over to the next step."""

    def __init__(self, seed: int, dev: torch.device):
        self.dev = dev
        self.noise = torch.Generator(device=dev).manual_seed(seed)
        with torch.random.fork_rng(devices=self._cuda()):  # only this device's generators are seeded and read
            torch.random.default_generator.manual_seed(seed)
            if dev.type == "cuda":
                with torch.cuda.device(dev):
                    torch.cuda.manual_seed(seed)
            self.rng = self._global()

    def _cuda(self) -> list:
        return [self.dev] if self.dev.type == "cuda" else []

    def _global(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if self.dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dev)
        return rng

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.Generator]:
        with torch.random.fork_rng(devices=self._cuda()):
            torch.set_rng_state(self.rng["torch"])
            if self.dev.type == "cuda":
                torch.cuda.set_rng_state(self.rng["cuda"], self.dev)
            yield self.noise
            self.rng = self._global()

    def state(self) -> dict[str, torch.Tensor]:
        return {"noise": self.noise.get_state(), **self.rng}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.noise.set_state(state["noise"])
        self.rng = {k: v for k, v in state.items() if k != "noise"}


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
        resume: dict | None = None, noise_streams: int = 1, parallel: Parallel | None = None) -> nn.Module:
    """Train `model` in place on uint8 images (N, C, H, W) or float points (N, D); return the EMA copy (or the model if no EMA).

    With labels, a `label_dropout` share of them is replaced by `null_label` so that the model also
    learns the unconditional score that classifier-free guidance needs.

    Each step's global batch of `batch_size` is split into `noise_streams` equal chunks; chunk c draws its
    loss noise and dropout from its own stream (seeded by `stream_seed(seed, c)`, carried across steps),
    and the step minimises the mean of the chunks' losses. `parallel` shares the chunks among processes:
    every process draws the same batch order and label dropout, computes the chunks of its rank (a
    `noise_streams / world` share), and `parallel.wrap` (of the loss as a module) averages the gradients,
    so each takes the same optimizer step as one process that computes every chunk (equal up to float
    rounding). With one stream the loop is the single-process loop it always was, bit for bit.

    Every `snapshot_every` steps (except the last) `on_snapshot` gets the loop's complete state; its
    tensors are live views, to be written before it returns. Passed back as `resume`, that state
    continues the run exactly as if it had never stopped: the same batches, noise, dropout masks, EMA,
    optimizer moments and logged losses. A state with non-finite weights is never handed out. Under
    `parallel`, every process must pass `on_snapshot` alike (the state gathers every stream's RNG).
    """
    par = parallel or Parallel()
    if batch_size % noise_streams or noise_streams % par.world:
        raise ValueError(f"batch_size {batch_size}, noise_streams {noise_streams} and world {par.world}: "
                         "noise_streams must divide batch_size, and the world noise_streams")
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # batch order and label dropout
    noise_gen = torch.Generator(device=dev).manual_seed(seed)  # the loss's noise (one stream)
    torch.manual_seed(seed)  # dropout (one stream)
    per_process = noise_streams // par.world
    chunk = batch_size // noise_streams
    mine = range(par.rank * per_process, (par.rank + 1) * per_process)  # this process's chunks
    streams = {c: _Stream(stream_seed(seed, c), dev) for c in mine} if noise_streams > 1 else {}
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
        _set_rng(resume["rng"], gen, noise_gen, streams, dev)
    net = par.wrap(_Objective(model, loss_fn))  # after resuming: every process starts from the same weights
    log_every = log_every or max(steps // 10, 1)
    net.train()
    t0 = time.monotonic()
    for step in range(start + 1, steps + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        lab_all = None
        if labels is not None:
            lab_all = labels[idx].clone()
            lab_all[torch.rand(len(idx), generator=gen) < label_dropout] = null_label
        opt.zero_grad(set_to_none=True)
        total = None  # this process's chunk losses, summed
        for j, c in enumerate(mine):
            rows = slice(c * chunk, (c + 1) * chunk)
            batch = to_model_space(data[idx[rows]]).to(dev)
            lab = None if lab_all is None else lab_all[rows].to(dev)
            last = j == per_process - 1
            # Chunks before the last accumulate gradients without synchronising; the last one's backward
            # (after the loss check, so every process stops together) averages them over the processes.
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
            with sync:
                if streams:
                    with streams[c].active() as noise:
                        loss = net(batch, lab, noise)
                else:
                    loss = net(batch, lab, noise_gen)
                if per_process > 1:
                    loss = loss / per_process
                if not last:
                    loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        reported = par.mean(total)  # the global batch's loss, the same in every process
        if not torch.isfinite(reported):
            raise NonFiniteError(f"training loss became {reported.item()} at step {step}; lower the learning rate")
        loss.backward()
        opt.step()
        if ema is not None:
            ema_update(ema, model, ema_decay)
        running += reported.item()
        if progress and (step % log_every == 0 or step == steps):
            k = step % log_every or log_every
            speed = (step - start) * batch_size / (time.monotonic() - t0)
            progress(step, steps, {"loss": running / k, "images_per_s": speed})
            running = 0.0
        if on_snapshot and snapshot_every and step % snapshot_every == 0 and step < steps:
            state = {"step": step, "cursor": cursor, "running": running, "order": order,
                     "rng": _get_rng(gen, noise_gen, streams, dev, par), "model": model.state_dict(),
                     "ema": {} if ema is None else ema.state_dict(), "optimizer": opt.state_dict()}
            for part in ("model", "ema"):
                if bad := non_finite(state[part]):
                    raise NonFiniteError(f"weights became NaN/inf at step {step} ({part} tensor `{bad}`); "
                                         "lower the learning rate")
            on_snapshot(state)
    model.eval()
    return ema if ema is not None else model


def _get_rng(gen: torch.Generator, noise_gen: torch.Generator, streams: dict[int, _Stream], dev: torch.device,
             par: Parallel) -> dict:
    if streams:  # every chunk's stream, from whichever process computes it (a collective under `par`)
        mine = {c: s.state() for c, s in streams.items()}
        every = {c: state for part in par.gather(mine) for c, state in part.items()}
        return {"batch": gen.get_state(), "streams": [every[c] for c in sorted(every)]}
    # The global generator drives dropout (and CUDA's, on a GPU): without it a resumed run draws other masks.
    rng = {"batch": gen.get_state(), "noise": noise_gen.get_state(), "torch": torch.get_rng_state()}
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    return rng


def _set_rng(rng: dict, gen: torch.Generator, noise_gen: torch.Generator, streams: dict[int, _Stream],
             dev: torch.device) -> None:
    gen.set_state(rng["batch"])
    if streams:
        for c, stream in streams.items():
            stream.load(rng["streams"][c])
        return
    noise_gen.set_state(rng["noise"])
    torch.set_rng_state(rng["torch"])
    if dev.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], dev)
