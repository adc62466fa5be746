"""Training throughput of the default model: the old eager fp32 loop against models.training.fit's paths.

    python bench/train.py                          # --device auto: CUDA when present, else the CPU
    python bench/train.py --device cuda --batch 256 --steps 300 --json bench/runs/train.json
    python bench/train.py --paths fit,fit+graph    # a subset (the baseline always runs)

The model is the project's default edm U-Net (params.yaml `model.edm`, `model.label_dim`) on MNIST-shaped
random uint8 data (1x28x28) held in memory. Every path starts from the same weights and seed, so it draws
the same batches and (where the noise RNG is honoured) the same noise: its mean loss over the warm-up steps
should match the baseline's closely (TF32 and bf16 move it a little; other noise moves it by percents).

- `baseline`: a faithful copy of the training loop before it was optimised (kept here, not in the library):
  per-step `isfinite` and `.item()` host syncs, the EMA as one `lerp_` per parameter, each batch indexed on
  the CPU and copied to the device, Adam's default implementation, fp32, the process's default TF32 settings.
- `fit`: models.training.fit as the pipeline calls it (no options); `fit+...`: with `amp` / `compile`.

Warm-up steps are not timed (compilation and CUDA-graph capture happen there); the clock starts and stops
after `torch.cuda.synchronize()`. FLOPs of one training step (forward + backward) are counted with
torch.utils.flop_counter.FlopCounterMode on a small CPU batch and scaled to the batch (they are linear in it).

On a CPU, amp and capture are forced on (models.training.ACCEL_ON_CPU) so that their code runs; a CPU run of
the pipeline ignores them. torch.compile paths are skipped on a CPU unless named in --paths (compiling takes
minutes on a small CPU). Paths that would start after --budget seconds are skipped; the JSON is rewritten
after every path, so a run stopped from outside keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import family as families
from models import training
from models.training import to_model_space

SHAPE = [1, 28, 28]
DATA_N = 60_000  # images in memory, as MNIST's training set
TARGET = 5.0
PATHS = {  # name -> fit options; in the order they run (the likeliest winners first, under --budget)
    "fit": {},
    "fit+graph": {"compile": "graph"},
    "fit+bf16+compile+graph": {"amp": "bf16", "compile": "default+graph"},
    "fit+bf16+graph": {"amp": "bf16", "compile": "graph"},
    "fit+compile+graph": {"compile": "default+graph"},
    "fit+reduce-overhead": {"compile": "reduce-overhead"},
    "fit+compile": {"compile": "default"},
    "fit+bf16": {"amp": "bf16"},
    "fit+bf16+reduce-overhead": {"amp": "bf16", "compile": "reduce-overhead"},
}
COMPILED = {name for name, kw in PATHS.items() if kw.get("compile", "none") not in ("none", "graph")}
# Seconds a path should have left under --budget to start (an H200 compiled the U-Net's step in 30-50 s, cold).
NEEDS = {"compile": 60.0, "other": 6.0}
LR, EMA_DECAY, SEED = 1e-3, 0.995, 0  # params.yaml's train defaults


def model_setup(params: Path = ROOT / "params.yaml") -> tuple:
    """(family, full model config) of params.yaml's edm U-Net on 1x28x28 images."""
    raw = yaml.safe_load(params.read_text()) or {}
    model = raw.get("model", {})
    fam = families.get("edm")
    config = {**fam.Config(**model.get("edm", {})).model_dump(), "image_shape": SHAPE,
              "label_dim": int(model.get("label_dim", 0)), "label_dropout": float(model.get("label_dropout", 0.1))}
    return fam, config


def old_loop(model, loss_fn, data, labels, *, steps, batch_size, lr, seed, ema_decay=0.0, label_dropout=0.0,
             null_label=-1, on_step=None):
    """The training loop before optimisation (models/training.py `fit` with one process and one noise stream),
    kept as it was: per-step host syncs, Python EMA, CPU indexing and a host-to-device copy per batch.
    `on_step(step, loss)` is the bench's hook (after the step's `.item()`)."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay > 0 else None
    n = data.shape[0]
    order, cursor = torch.randperm(n, generator=gen), 0
    model.train()
    for step in range(1, steps + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        lab = None
        if labels is not None:
            lab = labels[idx].clone()
            lab[torch.rand(len(idx), generator=gen) < label_dropout] = null_label
            lab = lab.to(dev)
        opt.zero_grad(set_to_none=True)
        batch = to_model_space(data[idx]).to(dev)
        loss = loss_fn(model, batch, lab, noise_gen)
        reported = loss.detach()
        if not torch.isfinite(reported):
            raise FloatingPointError(f"training loss became {reported.item()} at step {step}")
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - ema_decay)
                for e, b in zip(ema.buffers(), model.buffers()):
                    e.copy_(b)
        value = reported.item()
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return ema if ema is not None else model


def flops_per_image(fam, config, sample: int = 4) -> float:
    """FLOPs of one training step (forward + backward of the loss) per image, counted on a CPU batch."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = fam.build(config)
    x = torch.rand(sample, *SHAPE) * 2 - 1
    labels = torch.zeros(sample, dtype=torch.long) if config["label_dim"] else None
    with FlopCounterMode(display=False) as counter:
        fam.loss(config)(model, x, labels, torch.Generator().manual_seed(0)).backward()
    return counter.get_total_flops() / sample


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Clock:
    """Wall time from the end of warm-up step `warmup` to the end of the last step, both after a device sync;
    the mean loss over the warm-up steps."""

    def __init__(self, dev: torch.device, warmup: int, steps: int):
        self.dev, self.warmup, self.steps = dev, warmup, steps
        self.t0 = self.t1 = None
        self.warm_sum, self.warm_loss, self.last_loss = 0.0, None, None

    def step(self, step: int, loss: float) -> None:  # the baseline's per-step hook
        if step <= self.warmup:
            self.warm_sum += loss
        if step == self.warmup:
            self.mark(step, self.warm_sum / self.warmup)
        elif step == self.steps:
            self.mark(step, loss)

    def progress(self, step: int, total: int, figures: dict) -> None:  # fit's progress: every `warmup` steps
        if step == self.warmup or step == self.steps:
            self.mark(step, figures["loss"])

    def mark(self, step: int, loss: float) -> None:
        _sync(self.dev)
        if step == self.warmup:
            self.t0, self.warm_loss = time.perf_counter(), loss
        if step == self.steps:
            self.t1, self.last_loss = time.perf_counter(), loss


def run_path(name: str, fam, config, data, labels, dev, *, warmup: int, steps: int, batch: int,
             flops: float) -> dict:
    """Train `warmup + steps` steps on a fresh model; the timed part's figures."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if name in COMPILED:
        torch._dynamo.reset()
    total = warmup + steps
    clock = Clock(dev, warmup, total)
    said: list[str] = []
    torch.manual_seed(SEED)
    model = fam.build(config).to(dev)
    loss_fn = fam.loss(config)
    common = {"steps": total, "batch_size": batch, "lr": LR, "seed": SEED, "ema_decay": EMA_DECAY,
              "label_dropout": config["label_dropout"], "null_label": config["label_dim"]}
    start = time.perf_counter()
    if name == "baseline":
        old_loop(model, loss_fn, data, labels, on_step=clock.step, **common)
    else:
        def say(msg: str) -> None:
            said.append(msg)
            print(f"  {name}: {msg}", flush=True)

        training.fit(model, loss_fn, data, labels, progress=clock.progress, log_every=warmup, say=say,
                     **common, **PATHS[name])
    seconds = clock.t1 - clock.t0
    images = steps * batch / seconds
    fell_back = [m for m in said if any(w in m for w in ("failed", "unavailable", "no CUDA graph", "CUDA only",
                                                         "running eager", "runs eagerly", " off:"))]
    return {"images_per_s": images, "steps_per_s": steps / seconds, "flops_per_s": images * flops,
            "seconds": seconds, "wall_s": time.perf_counter() - start, "warmup_loss": clock.warm_loss,
            "last_loss": clock.last_loss, "messages": said, "fell_back": fell_back}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 256 on CUDA, 32 on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per path (default: 200 on CUDA, 4 on a CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 25 on CUDA, 5 on a CPU; "
                    f"at least {training.CAPTURE_WARMUP + 2} for the CUDA-graph paths)")
    ap.add_argument("--paths", default=None, help=f"comma-separated, from: {', '.join(PATHS)} (default: all; on a CPU "
                    "the torch.compile ones only when named)")
    ap.add_argument("--budget", type=float, default=80.0, help="seconds: paths that would start later are skipped")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--cudnn-benchmark", choices=["on", "off"], default=None,
                    help="fit's cudnn autotuning (models.training.CUDNN_BENCHMARK; default: as the library has it)")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    cuda = dev.type == "cuda"
    batch = args.batch or (256 if cuda else 32)
    steps = args.steps or (200 if cuda else 4)
    warmup = args.warmup or (25 if cuda else 5)
    wanted = list(PATHS) if args.paths is None else [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PATHS]
    if unknown:
        ap.error(f"unknown paths {', '.join(unknown)}; known: {', '.join(PATHS)}")
    skipped = {}
    if not cuda and args.paths is None:
        skipped = {p: "torch.compile on a CPU takes minutes: name it in --paths to run it" for p in wanted if p in COMPILED}
        wanted = [p for p in wanted if p not in COMPILED]

    began = time.perf_counter()
    fam, config = model_setup()
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (DATA_N, *SHAPE), dtype=torch.uint8, generator=gen)
    labels = (torch.randint(0, config["label_dim"], (DATA_N,), generator=gen) if config["label_dim"] else None)
    flops = flops_per_image(fam, config)
    name = torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    n_params = sum(p.numel() for p in fam.build(config).parameters())
    print(f"bench/train.py: edm U-Net {config['channels']} ({n_params:,} parameters) on {name}, torch {torch.__version__}; "
          f"batch {batch}, {warmup} warm-up + {steps} timed steps per path; "
          f"{flops * batch / 1e9:.2f} GFLOP per step ({flops / 1e6:.1f} MFLOP per image, forward + backward)", flush=True)
    report = {"device": name, "torch": torch.__version__, "batch": batch, "steps": steps, "warmup": warmup,
              "parameters": n_params, "flops_per_image": flops, "flops_per_step": flops * batch, "paths": {},
              "skipped": skipped}

    def write() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, sort_keys=True))

    saved = training.ACCEL_ON_CPU, training.CUDNN_BENCHMARK
    training.ACCEL_ON_CPU = not cuda  # on a CPU: run amp and the graph stand-in, not skip them
    if args.cudnn_benchmark:
        training.CUDNN_BENCHMARK = args.cudnn_benchmark == "on"
    report["cudnn_benchmark"] = training.CUDNN_BENCHMARK
    try:
        for path in ["baseline", *wanted]:
            left = args.budget - (time.perf_counter() - began)
            if path != "baseline" and left < NEEDS["compile" if path in COMPILED else "other"]:
                skipped[path] = f"out of --budget ({args.budget:.0f} s): {max(left, 0):.0f} s left"
                print(f"  {path}: skipped, {skipped[path]}", flush=True)
                continue
            try:
                figures = run_path(path, fam, config, data, labels, dev, warmup=warmup, steps=steps, batch=batch,
                                   flops=flops)
            except Exception as exc:  # noqa: BLE001 (one path's failure must not cost the others)
                detail = traceback.format_exc(limit=-3)
                figures = {"error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}
                print(f"  {path}: FAILED {figures['error']}\n{detail}", flush=True)
            report["paths"][path] = figures
            write()
    finally:
        training.ACCEL_ON_CPU, training.CUDNN_BENCHMARK = saved

    base = report["paths"].get("baseline", {})
    print(table(report, base), flush=True)
    if cuda:
        best = max((f.get("speedup", 0.0), p) for p, f in report["paths"].items() if p != "baseline") \
            if len(report["paths"]) > 1 else (0.0, "none")
        met = best[0] >= TARGET
        report["target"] = {"speedup": TARGET, "batch": batch, "best_path": best[1], "best_speedup": best[0], "met": met}
        note = "" if batch == 256 else f" (this run: batch {batch})"
        print(f"target on one H100/H200: >= {TARGET:g}x the eager-fp32 images/s at batch 256: "
              f"{'met' if met else 'not met'}{note}; best {best[1]} at {best[0]:.2f}x", flush=True)
    write()
    return report


def table(report: dict, base: dict) -> str:
    rows = [(f"{'path':<26}{'images/s':>12}{'steps/s':>10}{'TFLOP/s':>10}{'speed-up':>10}{'warm-up loss':>14}"
             f"{'vs base':>10}  notes")]
    for path, f in report["paths"].items():
        if "error" in f:
            rows.append(f"{path:<26}{'FAILED':>12}  {f['error'][:100]}")
            continue
        if base.get("images_per_s"):
            f["speedup"] = f["images_per_s"] / base["images_per_s"]
        rel = (abs(f["warmup_loss"] - base["warmup_loss"]) / abs(base["warmup_loss"])
               if base.get("warmup_loss") and f.get("warmup_loss") is not None else float("nan"))
        f["warmup_loss_rel_diff"] = rel
        notes = "; ".join(f["fell_back"])[:120] if f.get("fell_back") else ""
        rows.append(f"{path:<26}{f['images_per_s']:>12,.0f}{f['steps_per_s']:>10.1f}{f['flops_per_s'] / 1e12:>10.3f}"
                    f"{f.get('speedup', float('nan')):>9.2f}x{f['warmup_loss']:>14.5f}{rel:>10.1e}  {notes}")
    for path, why in report["skipped"].items():
        rows.append(f"{path:<26}{'skipped':>12}  {why}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
