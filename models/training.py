"""One training loop for base training and self-training: the family's own loss, Adam(W), EMA.

It can hand out its complete state and resume from it; storing that state is the caller's business.

On a CPU the loop is plain eager PyTorch, the same arithmetic in the same order as it always was (its results
are the reference, bit for bit). On a GPU it keeps the device busy instead of waiting on the host: the data
sit on the device and are indexed there, the loss stays there (checked and read every `check_every` steps),
the EMA is one foreach call, Adam is fused, TF32 and channels-last are on. `amp` adds bf16 autocast and
`compile` captures the step (torch.compile of the loss, or one CUDA graph of the whole step). Each of those
falls back to the eager loop, saying why in one line, where it cannot work.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.errors import NonFiniteError

Progress = Callable[[int, int, dict], None]  # (step, total, figures) -> None
Snapshot = Callable[[dict], None]  # (the loop's complete state, see `fit`) -> None

AMP = ("none", "bf16")  # fit's `amp`: autocast dtype of the loss's forward pass (CUDA only)
# fit's `compile` (CUDA only): "default" / "reduce-overhead" = torch.compile of the loss module in that mode;
# "graph" = the whole step (forward, backward, Adam, EMA) captured in one CUDA graph and replayed;
# "default+graph" = the torch.compile'd loss inside that graph.
COMPILE = ("none", "default", "reduce-overhead", "graph", "default+graph")
CAPTURE_WARMUP = 3  # eager steps (on a side stream) before the step is captured in a CUDA graph
DATA_SHARE = 0.25  # the data move to the GPU when they take at most this share of its free memory
# On CUDA, let cudnn time its algorithms for each new convolution shape. Measured on one H200 (default U-Net,
# batch 256): +6% images/s for the captured fp32 step, +16% bf16, at a one-off 7-15 s per process and dtype;
# this project's GPU runs train for about 30 s, so the heuristics' choice is kept.
CUDNN_BENCHMARK = False
# Tests set this to exercise the GPU-only paths on a CPU: amp and compile apply there too, and a stand-in
# that calls the step replaces the CUDA graph. Never set in production: the CPU loop is the reference.
ACCEL_ON_CPU = False


def _alone(x):
    return x


def _gather_alone(obj: Any) -> list[Any]:
    return [obj]


def _print(msg: str) -> None:
    print(msg, flush=True)


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
    model's methods the family's loss calls (e.g. the toy AR's `factors`) and however many times. Under
    `amp` the loss's forward pass runs in autocast (inside the module, so compile and DDP see it too)."""

    def __init__(self, model: nn.Module, loss_fn, amp: torch.dtype | None = None):
        super().__init__()
        self.model, self.loss_fn, self.amp = model, loss_fn, amp

    def forward(self, batch: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        if self.amp is None:
            return self.loss_fn(self.model, batch, labels, generator)
        # No weight-cast cache: each weight is used once per forward, and the cache is unsafe in CUDA graphs.
        with torch.autocast(batch.device.type, dtype=self.amp, cache_enabled=False):
            loss = self.loss_fn(self.model, batch, labels, generator)
        return loss.float()


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
    """ema <- lerp(ema, model, 1 - decay), all parameters in one foreach call (on a CPU the same bits as one
    `lerp_` per parameter); buffers are copied."""
    params = list(ema.parameters())
    if params:
        torch._foreach_lerp_(params, list(model.parameters()), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None if all are finite."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


@dataclass
class _Plan:
    """What the loop does beyond plain eager PyTorch on this device."""
    cuda: bool = False  # TF32, cudnn autotuning, channels-last, fused Adam
    amp: torch.dtype | None = None
    compile_mode: str | None = None  # torch.compile mode of the loss module
    capture: bool = False  # the whole step in one CUDA graph (a stand-in on a CPU under ACCEL_ON_CPU)
    channels_last: bool = False

    def describe(self) -> str:
        parts = ["data on the device, TF32, channels-last" if self.channels_last else "data on the device, TF32",
                 "fused Adam, foreach EMA, loss read every check_every steps"] if self.cuda else ["eager"]
        if self.amp is not None:
            parts.append("bf16 autocast")
        if self.compile_mode:
            parts.append(f"torch.compile({self.compile_mode})")
        if self.capture:
            parts.append("the whole step in one CUDA graph")
        return ", ".join(parts)


def _plan(dev: torch.device, amp: str, compile: str, par: Parallel, noise_streams: int, data: torch.Tensor,
          say: Callable[[str], None]) -> _Plan:
    if amp not in AMP:
        raise ValueError(f"amp must be one of {', '.join(AMP)}, not {amp!r}")
    if compile not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(COMPILE)}, not {compile!r}")
    cuda = dev.type == "cuda"
    if not (cuda or ACCEL_ON_CPU):
        if amp != "none" or compile != "none":
            say(f"[fit] amp={amp}, compile={compile}: CUDA only; training eager fp32 on {dev.type}")
        return _Plan()
    plan = _Plan(cuda=cuda, channels_last=cuda and data.dim() == 4)
    if amp == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            say(f"[fit] amp=bf16 off: {torch.cuda.get_device_name(dev)} has no bf16; training in fp32")
        else:
            plan.amp = torch.bfloat16
    plan.compile_mode = {"default": "default", "default+graph": "default",
                         "reduce-overhead": "reduce-overhead"}.get(compile)
    if compile in ("graph", "default+graph"):
        why = ("the loop runs in several processes (DDP)" if par.world > 1 else
               f"{noise_streams} noise streams swap the global RNG on the host between chunks" if noise_streams > 1
               else None)
        if why:
            say(f"[fit] compile={compile}: no CUDA graph, {why}; the step runs eagerly")
        else:
            plan.capture = True
    return plan


@contextlib.contextmanager
def _cuda_settings(on: bool) -> Iterator[None]:
    """TF32 matrix products and convolutions, cudnn autotuning (CUDNN_BENCHMARK); the process's settings come
    back afterwards."""
    if not on:
        yield
        return
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = True, CUDNN_BENCHMARK
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def _memory_format(fmt: torch.memory_format, modules: list[nn.Module],
                   opt: torch.optim.Optimizer | None = None) -> None:
    """Every 4-D weight of `modules` (in place: the same Parameter objects) and the optimizer's 4-D moments in `fmt`."""
    for m in modules:
        m.to(memory_format=fmt)
    if opt is not None:
        for state in opt.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() == 4:
                    state[k] = v.contiguous(memory_format=fmt)


def _resident(data: torch.Tensor, dev: torch.device, say: Callable[[str], None]) -> torch.Tensor | None:
    """The data on `dev` (moved once), or None where they would take too much of the GPU's memory."""
    if data.device == dev:
        return data
    if dev.type != "cuda":
        return None
    size = data.numel() * data.element_size()
    try:
        free = torch.cuda.mem_get_info(dev)[0]
    except RuntimeError:
        free = 0
    if size > DATA_SHARE * free:
        say(f"[fit] the data ({size / 2**30:.2f} GiB) stay in host memory: more than {DATA_SHARE:.0%} of the GPU's "
            f"free {free / 2**30:.2f} GiB; each batch is copied over")
        return None
    return data.to(dev)


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


class _Captured:
    """A CUDA graph of the step and its (static) loss output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, out: torch.Tensor):
        self.graph, self.out = graph, out

    def replay(self) -> None:
        self.graph.replay()


class _StandIn:
    """What replaces a CUDA graph on a CPU (ACCEL_ON_CPU): each replay calls the step."""

    def __init__(self, body: Callable[[], torch.Tensor], opt: torch.optim.Optimizer):
        self.body, self.opt, self.out = body, opt, None

    def replay(self) -> None:
        self.opt.zero_grad(set_to_none=True)  # a captured backward writes its gradients; this one accumulates
        self.out = self.body()


def fit(model: nn.Module, loss_fn, data: torch.Tensor, labels: torch.Tensor | None, *, steps: int,
        batch_size: int, lr: float, seed: int, ema_decay: float = 0.0, optimizer: str = "adam",
        label_dropout: float = 0.0, null_label: int = -1, progress: Progress | None = None,
        log_every: int = 0, snapshot_every: int = 0, on_snapshot: Snapshot | None = None,
        resume: dict | None = None, noise_streams: int = 1, parallel: Parallel | None = None,
        amp: str = "none", compile: str = "none", check_every: int = 0,
        say: Callable[[str], None] | None = None) -> nn.Module:
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

    The step's loss stays on the device: it is read, summed for the progress line and checked for NaN/inf
    every `check_every` steps (0: every `log_every`), at progress lines, snapshots and the end; a NaN/inf
    raises NonFiniteError naming the first step that had it (the steps after it still ran).

    Every `snapshot_every` steps (except the last) `on_snapshot` gets the loop's complete state; its
    tensors are live views, to be written before it returns. Passed back as `resume`, that state
    continues the run exactly as if it had never stopped: the same batches, noise, dropout masks, EMA,
    optimizer moments and logged losses. A state with non-finite weights is never handed out. Under
    `parallel`, every process must pass `on_snapshot` alike (the state gathers every stream's RNG).

    On CUDA only (`AMP`, `COMPILE`): `amp="bf16"` runs the loss's forward pass in bf16 autocast; `compile`
    captures the step. Where one of them cannot work it says why (through `say`, default print) and the
    step runs eagerly. The CPU loop ignores both (saying so) and is the reference, bit for bit.
    """
    say = say or _print
    par = parallel or Parallel()
    if batch_size % noise_streams or noise_streams % par.world:
        raise ValueError(f"batch_size {batch_size}, noise_streams {noise_streams} and world {par.world}: "
                         "noise_streams must divide batch_size, and the world noise_streams")
    if check_every < 0:
        raise ValueError(f"check_every must be 0 (every log_every steps) or positive, not {check_every}")
    dev = next(model.parameters()).device
    plan = _plan(dev, amp, compile, par, noise_streams, data, say)
    gen = torch.Generator().manual_seed(seed)  # batch order and label dropout
    noise_gen = torch.Generator(device=dev).manual_seed(seed)  # the loss's noise (one stream)
    torch.manual_seed(seed)  # dropout (one stream)
    per_process = noise_streams // par.world
    chunk = batch_size // noise_streams
    mine = range(par.rank * per_process, (par.rank + 1) * per_process)  # this process's chunks
    streams = {c: _Stream(stream_seed(seed, c), dev) for c in mine} if noise_streams > 1 else {}
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = _optimizer(opt_cls, model, lr, plan, say)
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
        if plan.capture and plan.cuda:  # a captured optimizer step keeps its step count on the device
            for group in opt.param_groups:
                group["capturable"] = True
        _set_rng(resume["rng"], gen, noise_gen, streams, dev)
    log_every = log_every or max(steps // 10, 1)
    check_every = check_every or log_every
    data_dev = _resident(data, dev, say)
    if plan.capture and data_dev is None:
        say("[fit] no CUDA graph: the data are not on the device; the step runs eagerly")
        plan.capture = False
    if plan.cuda:
        say(f"[fit] {dev}: {plan.describe()}")
    modules = [model] + ([ema] if ema is not None else [])
    graph = None
    with _cuda_settings(plan.cuda):
        try:
            if plan.channels_last:
                _memory_format(torch.channels_last, modules, opt)
            objective = _Objective(model, loss_fn, plan.amp)
            plain = par.wrap(objective)  # after resuming: every process starts from the same weights
            net = plain
            if plan.compile_mode:
                try:
                    net = torch.compile(plain, mode=plan.compile_mode)
                except Exception as exc:  # noqa: BLE001 (any failure to set up compilation: run eager)
                    say(f"[fit] torch.compile(mode={plan.compile_mode}) unavailable ({_short(exc)}); running eager")
            net.train()
            static_idx = torch.empty(batch_size, dtype=torch.long, device=dev) if plan.capture else None
            static_lab = (torch.empty(batch_size, dtype=labels.dtype, device=dev)
                          if plan.capture and labels is not None else None)
            side = torch.cuda.Stream(dev) if plan.capture and plan.cuda else None

            def batch_of(idx: torch.Tensor, idx_dev: torch.Tensor, rows: slice) -> torch.Tensor:
                x = to_model_space(data_dev[idx_dev[rows]]) if data_dev is not None else \
                    to_model_space(data[idx[rows]]).to(dev)
                return x.contiguous(memory_format=torch.channels_last) if plan.channels_last else x

            def eager_step(idx: torch.Tensor, idx_dev: torch.Tensor, lab_all: torch.Tensor | None) -> torch.Tensor:
                if plan.compile_mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                opt.zero_grad(set_to_none=True)
                lab_dev = None if lab_all is None else lab_all.to(dev, non_blocking=True)
                total = loss = None  # total: this process's chunk losses, summed
                for j, c in enumerate(mine):
                    rows = slice(c * chunk, (c + 1) * chunk)
                    batch = batch_of(idx, idx_dev, rows)
                    lab = None if lab_dev is None else lab_dev[rows]
                    last = j == per_process - 1
                    # Chunks before the last accumulate gradients without synchronising; the last one's
                    # backward averages them over the processes.
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
                loss.backward()
                opt.step()
                if ema is not None:
                    ema_update(ema, model, ema_decay)
                # A reduce-overhead graph's outputs are overwritten by its next replay.
                return reported.clone() if plan.compile_mode == "reduce-overhead" else reported

            def guarded_step(*args) -> torch.Tensor:
                """The first compiled step: a failure to compile puts the RNG back and runs eager from then on."""
                nonlocal net
                rng = _rng_state(noise_gen, streams, dev)
                try:
                    return eager_step(*args)
                except Exception as exc:  # noqa: BLE001 (whatever torch.compile raises: run eager)
                    say(f"[fit] torch.compile(mode={plan.compile_mode}) failed ({_short(exc)}); running eager")
                    _restore_rng(rng, noise_gen, streams, dev)
                    net = plain
                    plan.compile_mode = None
                    return eager_step(*args)

            def body() -> torch.Tensor:
                """The step as a CUDA graph captures it: static inputs, one chunk, one process."""
                batch = to_model_space(data_dev[static_idx])
                if plan.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                loss = net(batch, static_lab, noise_gen)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema_update(ema, model, ema_decay)
                return loss.detach()

            def capture():
                """The step in one CUDA graph (the stand-in on a CPU), or None where it cannot be captured."""
                rng = _rng_state(noise_gen, streams, dev)
                try:
                    if not plan.cuda:
                        return _StandIn(body, opt)
                    g = torch.cuda.CUDAGraph()
                    # The loss draws its noise from its own generator: the graph advances it on each replay.
                    g.register_generator_state(noise_gen)
                    opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients (static)
                    torch.cuda.synchronize(dev)
                    with torch.cuda.graph(g, stream=side):
                        out = body()
                    return _Captured(g, out)
                except Exception as exc:  # noqa: BLE001 (any capture failure: run eager)
                    say(f"[fit] CUDA-graph capture failed ({_short(exc)}); the step runs eagerly")
                    if plan.cuda:
                        with contextlib.suppress(Exception):
                            torch.cuda.synchronize(dev)
                    _restore_rng(rng, noise_gen, streams, dev)
                    plan.capture = False
                    return None

            pending: list[torch.Tensor] = []  # the reported losses of the steps since the last check

            def check(step: int) -> None:
                """Read the pending losses (one sync), add them to `running`, raise at the first NaN/inf."""
                nonlocal running
                if not pending:
                    return
                values = torch.stack([t.reshape(()) for t in pending]).tolist()
                first = step - len(pending) + 1
                pending.clear()
                for i, value in enumerate(values):
                    if not math.isfinite(value):
                        raise NonFiniteError(f"training loss became {value} at step {first + i}; "
                                             "lower the learning rate")
                    running += value  # one at a time, as the loop always summed (not sum(): compensated in 3.12)

            first_step = start + 1
            order_dev = order.to(dev) if data_dev is not None else order
            t0 = time.monotonic()
            for step in range(start + 1, steps + 1):
                if cursor + batch_size > n:
                    order, cursor = torch.randperm(n, generator=gen), 0
                    order_dev = order.to(dev) if data_dev is not None else order
                idx = order[cursor:cursor + batch_size]
                idx_dev = order_dev[cursor:cursor + batch_size]
                cursor += batch_size
                lab_all = None
                if labels is not None:
                    lab_all = labels[idx].clone()
                    lab_all[torch.rand(len(idx), generator=gen) < label_dropout] = null_label
                if plan.capture and graph is None and step > first_step + CAPTURE_WARMUP - 1:
                    graph = capture()
                if graph is not None:
                    static_idx.copy_(idx_dev)
                    if static_lab is not None:
                        static_lab.copy_(lab_all, non_blocking=True)
                    graph.replay()
                    pending.append(graph.out.clone())
                else:
                    run = guarded_step if step == first_step and plan.compile_mode else eager_step
                    if side is not None and plan.capture:  # warm-up before capture, as CUDA graphs want it
                        side.wait_stream(torch.cuda.current_stream(dev))
                        with torch.cuda.stream(side):
                            pending.append(run(idx, idx_dev, lab_all))
                        torch.cuda.current_stream(dev).wait_stream(side)
                    else:
                        pending.append(run(idx, idx_dev, lab_all))
                log_now = bool(progress) and (step % log_every == 0 or step == steps)
                snap_now = bool(on_snapshot) and bool(snapshot_every) and step % snapshot_every == 0 and step < steps
                if log_now or snap_now or step % check_every == 0 or step == steps:
                    check(step)
                if log_now:
                    k = step % log_every or log_every
                    speed = (step - start) * batch_size / (time.monotonic() - t0)
                    progress(step, steps, {"loss": running / k, "images_per_s": speed})
                    running = 0.0
                if snap_now:
                    state = {"step": step, "cursor": cursor, "running": running, "order": order,
                             "rng": _get_rng(gen, noise_gen, streams, dev, par), "model": model.state_dict(),
                             "ema": {} if ema is None else ema.state_dict(), "optimizer": opt.state_dict()}
                    for part in ("model", "ema"):
                        if bad := non_finite(state[part]):
                            raise NonFiniteError(f"weights became NaN/inf at step {step} ({part} tensor `{bad}`); "
                                                 "lower the learning rate")
                    on_snapshot(state)
        finally:
            if graph is not None:
                opt.zero_grad(set_to_none=True)  # the gradients live in the graph's memory
            if plan.channels_last:
                _memory_format(torch.contiguous_format, modules, opt)
    model.eval()
    return ema if ema is not None else model


def _optimizer(opt_cls, model: nn.Module, lr: float, plan: _Plan,
               say: Callable[[str], None]) -> torch.optim.Optimizer:
    """Adam(W) as the loop always made it; on CUDA fused (one kernel for all parameters), and capturable
    (its step count on the device) when the step is captured in a CUDA graph."""
    if not plan.cuda:
        return opt_cls(model.parameters(), lr=lr)
    try:
        return opt_cls(model.parameters(), lr=lr, fused=True, capturable=plan.capture)
    except (RuntimeError, ValueError) as exc:
        say(f"[fit] fused {opt_cls.__name__} unavailable ({_short(exc)}); using the foreach one")
        return opt_cls(model.parameters(), lr=lr, capturable=plan.capture)


def _rng_state(noise_gen: torch.Generator, streams: dict[int, _Stream], dev: torch.device) -> dict:
    """Every RNG a step draws from (not the batch order's): to undo a step that failed to compile or capture."""
    state = {"noise": noise_gen.get_state(), "torch": torch.get_rng_state(),
             "streams": {c: s.state() for c, s in streams.items()}}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _restore_rng(state: dict, noise_gen: torch.Generator, streams: dict[int, _Stream], dev: torch.device) -> None:
    noise_gen.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    for c, s in streams.items():
        s.load(state["streams"][c])
    if dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev)


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
