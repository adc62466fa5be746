"""models/training.fit's paths: the CPU loop is the old loop bit for bit (a frozen copy of it is at the end
of this file), the loss is read every `check_every` steps yet a NaN is still named at its step, the foreach
EMA, the GPU-only options (amp, compile, CUDA-graph capture) exercised on the CPU through
`training.ACCEL_ON_CPU` with their fallbacks, the params that carry them, bench/train.py, and, where a GPU is
present, the CUDA paths themselves (capture against eager, resume, bf16, compile).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time

import pytest
import torch
from torch import nn

from models import family as families
from models import training
from models.errors import NonFiniteError
from models.training import Parallel, Progress, Snapshot, fit

CUDA = torch.cuda.is_available()
# Conditional EDM with dropout, 8x8 images: every RNG the loop uses is exercised; a step takes milliseconds.
SHAPE = [1, 8, 8]
CONFIG = {"channels": [8, 16], "emb_dim": 16, "dropout": 0.1, "sigma_data": 0.5, "label_dim": 10,
          "label_dropout": 0.2, "image_shape": SHAPE}
FAM = families.get("edm")
IMAGES = (torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
LABELS = torch.arange(64) % 10


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the same reductions in every run of a comparison (and kind to a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(trainer, *, steps=14, dev="cpu", labels=True, snapshots=None, **kw):
    """(returned weights, logged (step, loss), snapshot states) of one run from the same initial weights."""
    torch.manual_seed(0)
    model = FAM.build(CONFIG).to(dev)
    logged, states = [], []
    args = {"steps": steps, "batch_size": 8, "lr": 2e-3, "seed": 0, "ema_decay": 0.9, "label_dropout": 0.2,
            "null_label": 10, "log_every": 3,
            "progress": lambda step, total, figures: logged.append((step, figures["loss"])), **kw}
    if snapshots:
        args.update(snapshot_every=snapshots, on_snapshot=lambda state: states.append(copy.deepcopy(state)))
    out = trainer(model, FAM.loss(CONFIG), IMAGES, LABELS if labels else None, **args)
    return {k: v.detach().cpu().clone() for k, v in out.state_dict().items()}, logged, states


def same(a, b) -> bool:
    """Equal to the last bit: tensors (and their dtypes), numbers, and nested dicts/lists/tuples of them."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def close(a: dict, b: dict, rtol: float, atol: float) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol) for k in a)


# --- the CPU loop is the old loop, bit for bit ------------------------------------------------------------------

CASES = {
    "ema+labels": {},
    "no-ema, adamw, no labels": {"ema_decay": 0.0, "optimizer": "adamw", "labels": False},
    "two noise streams": {"noise_streams": 2},
    "snapshots": {"snapshots": 4},
    "one log line": {"log_every": 0, "steps": 9},
}


@pytest.mark.parametrize("case", CASES)
def test_the_cpu_loop_is_the_old_loop_bit_for_bit(case):
    new, old = run(fit, **CASES[case]), run(old_fit, **CASES[case])
    assert same(new[0], old[0]), "weights differ"
    assert new[1] == old[1] and new[1], f"logged losses differ: {new[1]} vs {old[1]}"
    assert same(new[2], old[2]), "snapshot states differ"


def test_a_resumed_run_continues_the_old_loop_exactly():
    """A run killed after its step-7 snapshot and resumed (from a state the new loop wrote, and from one the old
    loop wrote: the format is unchanged) ends where the old loop's uninterrupted run ends."""
    whole = run(old_fit, snapshots=7)
    states = run(fit, snapshots=7, steps=7 + 1)[2]  # stops after one snapshot
    for state in (states[0], whole[2][0]):
        resumed = run(fit, snapshots=7, resume=copy.deepcopy(state))
        assert same(resumed[0], whole[0])
        assert resumed[1] == [entry for entry in whole[1] if entry[0] > 7]
        assert same(resumed[2], whole[2][1:])


@pytest.mark.parametrize("check_every", [1, 2, 5, 100])
def test_how_often_the_loss_is_read_changes_nothing(check_every):
    assert same(run(fit, check_every=check_every, snapshots=4), run(old_fit, snapshots=4))


def test_the_logged_loss_is_the_float_sum_of_the_step_losses():
    """The old loop summed `.item()`s in Python floats; a float64 tensor summing the same fp32 values in the same
    order (what a device-side accumulator would do) gives the same bits, and so does the loop's sum at a check."""
    values = torch.randn(500, generator=torch.Generator().manual_seed(3)).exp() ** 8  # wide dynamic range
    python, tensor = 0.0, torch.zeros((), dtype=torch.float64)
    for v in values:
        python += v.item()
        tensor += v.to(torch.float64)
    assert python == tensor.item()
    looped = 0.0
    for v in torch.stack(list(values)).tolist():  # as the loop sums at a check (Python 3.12's sum() compensates)
        looped += v
    assert looped == python


@pytest.mark.parametrize(("check_every", "bad"), [(5, "nan"), (1, "nan"), (100, "inf")])
def test_a_nan_loss_is_named_at_its_step_though_read_later(check_every, bad):
    calls, real = [], FAM.loss(CONFIG)

    def loss(model, batch, labels, gen):
        calls.append(1)
        value = real(model, batch, labels, gen)
        return value * float(bad) if len(calls) == 9 else value

    torch.manual_seed(0)
    with pytest.raises(NonFiniteError) as err:
        fit(FAM.build(CONFIG), loss, IMAGES, LABELS, steps=12, batch_size=8, lr=1e-3, seed=0, log_every=6,
            check_every=check_every)
    assert str(err.value) == f"training loss became {bad} at step 9; lower the learning rate"


def test_a_nan_loss_is_reported_before_a_snapshot_of_its_weights():
    """The loss is checked before a snapshot's weights: the error names the loss's step, not the weights."""
    calls, real = [], FAM.loss(CONFIG)

    def loss(model, batch, labels, gen):
        calls.append(1)
        value = real(model, batch, labels, gen)
        return value * math.nan if len(calls) == 5 else value

    torch.manual_seed(0)
    written = []
    with pytest.raises(NonFiniteError, match=r"^training loss became nan at step 5;"):
        fit(FAM.build(CONFIG), loss, IMAGES, LABELS, steps=12, batch_size=8, lr=1e-3, seed=0, log_every=100,
            snapshot_every=4, on_snapshot=lambda state: written.append(state["step"]))
    assert written == [4]


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.995, 0.9999])
def test_the_foreach_ema_is_the_per_parameter_lerp_bit_for_bit(decay):
    torch.manual_seed(1)
    model = FAM.build(CONFIG)
    ema = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(3):
        training.ema_update(ema, model, decay)
        old_ema_update(reference, model, decay)
    assert same(ema.state_dict(), reference.state_dict())


# --- the GPU-only options on a CPU ------------------------------------------------------------------------------

def test_on_a_cpu_amp_and_compile_are_ignored_saying_so():
    said = []
    assert same(run(fit, amp="bf16", compile="default+graph", say=said.append), run(old_fit))
    assert said == ["[fit] amp=bf16, compile=default+graph: CUDA only; training eager fp32 on cpu"]


@pytest.mark.parametrize(("option", "value"), [("amp", "fp16"), ("compile", "max-autotune"), ("check_every", -1)])
def test_unknown_options_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        run(fit, **{option: value})


@pytest.fixture
def accel(monkeypatch):
    """The GPU-only paths run on the CPU (the CUDA graph replaced by a stand-in that calls the step)."""
    monkeypatch.setattr(training, "ACCEL_ON_CPU", True)


@pytest.mark.parametrize("case", ["ema+labels", "no-ema, adamw, no labels", "snapshots"])
def test_the_captured_step_is_the_eager_step(accel, case):
    """compile="graph": 3 eager warm-up steps, then the step built for capture (static index and label
    buffers, one chunk) replays: on a CPU its stand-in gives the eager loop's bits, snapshots included."""
    said = []
    assert same(run(fit, compile="graph", say=said.append, **CASES[case]), run(old_fit, **CASES[case]))
    assert said == []


def test_a_captured_run_resumes_exactly(accel):
    whole = run(old_fit, snapshots=7)
    state = run(fit, compile="graph", snapshots=7, steps=8)[2][0]
    resumed = run(fit, compile="graph", snapshots=7, resume=copy.deepcopy(state))  # captures again after resuming
    assert same(resumed[0], whole[0]) and resumed[1] == [e for e in whole[1] if e[0] > 7]


def test_capture_is_refused_where_the_host_swaps_rngs(accel):
    said = []
    assert same(run(fit, compile="graph", noise_streams=2, say=said.append), run(old_fit, noise_streams=2))
    assert said == [("[fit] compile=graph: no CUDA graph, 2 noise streams swap the global RNG on the host between "
                     "chunks; the step runs eagerly")]


def test_a_failed_capture_falls_back_to_the_eager_step(accel, monkeypatch):
    class Refused:
        def __init__(self, body, opt):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(training, "_StandIn", Refused)
    said = []
    assert same(run(fit, compile="graph", say=said.append), run(old_fit))
    assert said == [("[fit] CUDA-graph capture failed (RuntimeError: operation not permitted when stream is "
                     "capturing); the step runs eagerly")]


def test_a_failed_compile_puts_the_rng_back_and_runs_eager(accel, monkeypatch):
    """torch.compile fails lazily, in the first step, possibly after drawing noise: the step is redone eagerly
    from the same RNG state, so the run is the eager one bit for bit."""
    class Broken(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batch, labels, generator):
            torch.randn(100, generator=generator)  # draws, then fails, as a half-traced graph might
            torch.rand(3)
            raise RuntimeError("inductor: backend compiler failed\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda module, mode=None: Broken(module))
    said = []
    assert same(run(fit, compile="default", say=said.append), run(old_fit))
    assert said == [("[fit] torch.compile(mode=default) failed (RuntimeError: inductor: backend compiler failed); "
                     "running eager")]


def test_compile_that_cannot_even_start_runs_eager(accel, monkeypatch):
    def unavailable(module, mode=None):
        raise RuntimeError("Dynamo is not supported on Python 3.99")

    monkeypatch.setattr(torch, "compile", unavailable)
    said = []
    assert same(run(fit, compile="reduce-overhead", say=said.append), run(old_fit))
    assert said == [("[fit] torch.compile(mode=reduce-overhead) unavailable (RuntimeError: Dynamo is not supported on "
                     "Python 3.99); running eager")]


def test_bf16_autocast_trains_close_to_fp32(accel):
    fp32 = run(old_fit, steps=10)
    bf16 = run(fit, amp="bf16", compile="graph", steps=10)
    assert all(t.is_contiguous() for t in bf16[0].values())
    assert all(math.isfinite(loss) for _, loss in bf16[1])
    assert not same(bf16[0], fp32[0]), "bf16 autocast changed nothing"
    assert close(bf16[0], fp32[0], rtol=0.05, atol=0.02)
    for (_, a), (_, b) in zip(bf16[1], fp32[1]):
        assert abs(a - b) <= 0.05 * abs(b)


@pytest.mark.skipif(CUDA, reason="the CUDA tests below compile on the GPU")
def test_torch_compile_of_the_loss_trains_as_eager(accel):
    """Inductor on the CPU (a tiny vector family: seconds to compile), then through the graph stand-in."""
    fam = families.get("toy_diffusion")
    config = {**fam.Config().model_dump(), "width": 8, "depth": 1, "image_shape": [2], "label_dim": 0}
    points = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def trained(**kw):
        torch.manual_seed(0)
        logged = []
        out = fit(fam.build(config), fam.loss(config), points, None, steps=8, batch_size=16, lr=1e-2, seed=0,
                  ema_decay=0.5, log_every=1, progress=lambda s, t, f: logged.append(f["loss"]), **kw)
        return out.state_dict(), logged

    eager = trained()
    for mode in ("default", "default+graph"):
        said = []
        compiled = trained(compile=mode, say=said.append)
        assert said == [], said
        assert close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
        assert compiled[1] == pytest.approx(eager[1], rel=1e-4)


def test_channels_last_round_trip_keeps_every_value():
    torch.manual_seed(0)
    model = FAM.build(CONFIG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    FAM.loss(CONFIG)(model, torch.randn(4, *SHAPE), None, torch.Generator().manual_seed(0)).backward()
    opt.step()
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    params = list(model.parameters())
    training._memory_format(torch.channels_last, [model], opt)
    assert list(model.parameters()) == params, "the optimizer must keep holding the same Parameter objects"
    conv = model.net.down[0].conv2.weight  # 8 -> 8 channels: the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert opt.state[conv]["exp_avg"].stride() == conv.stride()
    training._memory_format(torch.contiguous_format, [model], opt)
    assert all(t.is_contiguous() for t in model.state_dict().values())
    assert same((model.state_dict(), opt.state_dict()), before)


# --- params and stages -----------------------------------------------------------------------------------------

def test_params_carry_amp_and_compile():
    from stages.params import FinetuneParams, ParamsError, TrainParams, parse

    assert (TrainParams().amp, TrainParams().compile, FinetuneParams().amp, FinetuneParams().compile) == ("none",) * 4
    p = parse({"train": {"amp": "bf16", "compile": "default+graph"}, "finetune": {"compile": "reduce-overhead"}})
    assert (p.train.amp, p.train.compile, p.finetune.compile) == ("bf16", "default+graph", "reduce-overhead")
    assert set(TrainParams.model_fields["compile"].annotation.__args__) == set(training.COMPILE)
    assert set(TrainParams.model_fields["amp"].annotation.__args__) == set(training.AMP)
    with pytest.raises(ParamsError, match="train.compile"):
        parse({"train": {"compile": "max-autotune"}})
    with pytest.raises(ParamsError, match="finetune.amp"):
        parse({"finetune": {"amp": "fp16"}})


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_the_stages_pass_amp_and_compile_to_fit(stage, tmp_path, monkeypatch):
    resume = pytest.importorskip("tests.faults.test_resume_training")
    from stages import finetune, snapshots, train
    from stages.params import BaseParams, FinetuneParams, ModelParams, TrainParams

    resume.make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    seen = []

    def spy(*args, **kw):
        seen.append({k: kw.get(k) for k in ("amp", "compile")})
        raise KeyboardInterrupt  # enough: the arguments arrived

    monkeypatch.setattr(snapshots, "fit", spy)
    model = ModelParams.model_validate(resume.MODEL)
    opts = {"steps": 2, "batch_size": 8, "amp": "bf16", "compile": "graph"}
    with pytest.raises(KeyboardInterrupt):
        if stage == "train":
            train.run(model, TrainParams(**opts), BaseParams())
        else:
            finetune.run(FinetuneParams(**opts), model)
    assert seen == [{"amp": "bf16", "compile": "graph"}]


# --- bench/train.py --------------------------------------------------------------------------------------------

def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", training.__file__.replace(
        "models/training.py", "bench/train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_baseline_is_the_old_loop():
    bench = _bench()
    fam, config = bench.model_setup()
    assert config["channels"] == [16, 32, 32] and config["image_shape"] == [1, 28, 28]
    data = (torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.arange(40) % 10
    small = {**config, "channels": [8], "emb_dim": 16, "label_dim": 10}
    kw = {"steps": 7, "batch_size": 8, "lr": 1e-3, "seed": 0, "ema_decay": 0.9, "label_dropout": 0.2,
          "null_label": 10}
    outs = []
    for loop in (bench.old_loop, old_fit):
        torch.manual_seed(0)
        outs.append(loop(fam.build(small), fam.loss(small), data, labels, **kw).state_dict())
    assert same(outs[0], outs[1])


def test_the_bench_runs_on_a_cpu_in_under_a_minute(tmp_path, capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "DATA_N", 2000)
    monkeypatch.setitem(bench.PATHS, "fit+broken", {"compile": "bogus"})  # a failing path is reported, no more
    t0 = time.monotonic()
    report = bench.main(["--device", "cpu", "--batch", "8", "--steps", "2", "--warmup", "5", "--json",
                         str(tmp_path / "out.json")])
    assert time.monotonic() - t0 < 60
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["paths"].keys() == report["paths"].keys()
    assert set(report["paths"]) == {"baseline", "fit", "fit+graph", "fit+bf16+graph", "fit+bf16", "fit+broken"}
    assert "ValueError: compile must be one of" in report["paths"]["fit+broken"]["error"]
    for name in ("baseline", "fit", "fit+graph", "fit+bf16"):
        figures = report["paths"][name]
        assert figures["images_per_s"] > 0 and figures["flops_per_s"] > 0 and figures["speedup"] > 0
    # The same weights, batches and noise: on a CPU fit's warm-up loss is the baseline's to the last bit.
    assert report["paths"]["fit"]["warmup_loss"] == report["paths"]["baseline"]["warmup_loss"]
    assert report["paths"]["fit+graph"]["warmup_loss"] == report["paths"]["baseline"]["warmup_loss"]
    assert 1e8 < report["flops_per_image"] < 2e8  # ~114.5 MFLOP per 28x28 image, forward + backward
    assert "speed-up" in out and "target on one H100/H200" not in out  # the target line is for CUDA runs
    assert set(report["skipped"]) == {p for p in bench.PATHS if p in bench.COMPILED}


# --- on a GPU ---------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _per_step(trainer=fit, steps=12, **kw):
    return run(trainer, dev="cuda", steps=steps, log_every=1, **kw)


def tracks(reference: list, other: list, rtol: float) -> None:
    """Step losses of two GPU runs from the same weights and seed. Step 1 must agree to float rounding whatever
    the arithmetic (the U-Net's last convolution starts at zero, so its loss is a function of the data and the
    noise alone): other noise moves it by percents. Later steps agree within `rtol` (TF32, bf16, fusion)."""
    assert [s for s, _ in reference] == [s for s, _ in other]
    (_, a), (_, b) = reference[0], other[0]
    assert abs(a - b) <= 1e-5 * abs(a), f"step 1: {a} vs {b}: not the same noise"
    for (s, a), (_, b) in zip(reference, other):
        assert abs(a - b) <= rtol * abs(a), f"step {s}: {a} vs {b}"


def fell_back(said: list[str]) -> list[str]:
    return [m for m in said if any(w in m for w in ("failed", "unavailable", "no CUDA graph", "stay in host"))]


@cuda_only
def test_cuda_the_captured_step_draws_the_eager_noise():
    """Capture against eager on the GPU: the same noise and dropout masks (the graph advances the loss's own
    generator and the default one), so the step losses agree to float rounding, and the weights stay close."""
    said = []
    eager, graph = _per_step(), _per_step(compile="graph", say=said.append)
    assert not fell_back(said), said
    tracks(eager[1], graph[1], rtol=1e-3)
    assert close(graph[0], eager[0], rtol=1e-2, atol=1e-3)
    assert all(t.is_contiguous() for t in graph[0].values())  # channels-last undone: checkpoints save as before


@cuda_only
def test_cuda_a_captured_run_resumes():
    whole = _per_step(compile="graph", snapshots=6)
    state = _per_step(compile="graph", snapshots=6, steps=7)[2][0]
    resumed = _per_step(compile="graph", snapshots=6, resume=copy.deepcopy(state))
    later = [e for e in whole[1] if e[0] > 6]
    assert [s for s, _ in resumed[1]] == [s for s, _ in later]
    for (s, a), (_, b) in zip(later, resumed[1]):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {s}: {a} vs {b}"
    assert close(resumed[0], whole[0], rtol=1e-2, atol=1e-3)


@cuda_only
def test_cuda_the_old_loop_and_fit_agree():
    """Data on the device, fused Adam, foreach EMA, TF32, channels-last: the same training, up to rounding."""
    tracks(_per_step(old_fit)[1], _per_step()[1], rtol=1e-2)


@cuda_only
@pytest.mark.parametrize("options", [{"amp": "bf16", "compile": "graph"}, {"compile": "default+graph"}])
def test_cuda_options_train_as_eager(options):
    """(compile="reduce-overhead" is checked by bench/train.py's warm-up loss: compiling costs ~20 s a mode.)"""
    said = []
    eager, other = _per_step(steps=8), _per_step(steps=8, say=said.append, **options)
    assert not fell_back(said), said
    tracks(eager[1], other[1], rtol=5e-2 if options.get("amp") else 1e-2)


@cuda_only
def test_cuda_data_too_large_for_the_gpu_stay_on_the_host(monkeypatch):
    monkeypatch.setattr(training, "DATA_SHARE", 0.0)
    said = []
    eager, host = _per_step(steps=6), _per_step(steps=6, compile="graph", say=said.append)
    assert any("stay in host memory" in m for m in said) and any("no CUDA graph" in m for m in said), said
    tracks(eager[1], host[1], rtol=1e-3)


# --- the training loop before it was optimised: a frozen copy of models/training.py's loop ---------------------
# (Only renamed: fit -> old_fit, ema_update -> old_ema_update. Never edit: it is the reference.)
# The helpers it shares, unchanged since, are imported rather than copied.
from models.training import (_get_rng, _set_rng, _Stream, non_finite, stream_seed,  # noqa: E402
                             to_model_space)


class _Objective(nn.Module):
    """The loss as a module, so that a wrapper (DDP) sees every use of the model's weights, whichever of the
    model's methods the family's loss calls (e.g. the toy AR's `factors`) and however many times."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        return self.loss_fn(self.model, batch, labels, generator)


@torch.no_grad()
def old_ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def old_fit(model: nn.Module, loss_fn, data: torch.Tensor, labels: torch.Tensor | None, *, steps: int,
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
            old_ema_update(ema, model, ema_decay)
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


