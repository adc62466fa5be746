"""Throughput of the sampling and evaluation hot paths, old against new, on the CPU and on CUDA.

    python bench/sample.py                                  # --device auto: CUDA when present, else CPU
    python bench/sample.py --device cuda --json bench/results/sample_cuda.json
    python bench/sample.py --device cpu --batch-sizes 8 --batches 1 --n 20   # a quick CPU check (~30 s)

Sampling: the default model (params.yaml `model.edm`, an untrained U-Net of that config, 1x28x28,
`model.label_dim`) with the default Heun settings (`sample.sampler.edm`), timed at each batch size
for the old path (per-sample noise drawn on the CPU and copied to the device, guidance as two
forward passes; a faithful copy of that code is below) and the new one (models.sampling.generate:
Philox noise drawn on CUDA, guidance in one doubled forward pass on CUDA). params.yaml's
label_dim 0 leaves nothing to guide, so a `guided` variant (label_dim 10, guidance 2) is timed
too (--no-guided skips it). Reported: images/s, the network's FLOPs per sample and call
(torch.utils.flop_counter) and the achieved FLOP/s, and new/old ratios. "max" in --batch-sizes is
the largest batch whose guided forward pass fits on the GPU (found by doubling; ignored on the CPU).

Noise: the cost of drawing one batch of latents per method (CPU generators + copy, one CUDA
generator per sample, Philox on the device), the measurement behind models/sampling.py's choice.

Inception (skipped with a message when the network file is missing): images/s of feature
extraction with clean-fid's PIL resize against the batched resize on the device, and whether the
two give the same features. Precision/recall: the old dense computation (a copy below; skipped
above --pr-dense-max samples, where its n x n matrices get large) against the chunked one, at --n
samples of 128-d features (default 5000 on the CPU, 50000 on CUDA), the chunked one also on CUDA.

Every section catches its own failure and records it under "errors" (the exit status is 0 unless
the arguments are wrong), so a one-shot GPU run always leaves its JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import edm, metrics
from models.sampling import PerSampleNoise, class_labels, generate
from models.training import to_uint8

GUIDED = {"label_dim": 10, "guidance": 2.0}


# ---- the old path, copied verbatim from models/sampling.py, models/guidance.py and models/edm.py ----

class OldPerSampleNoise:
    """A stack of generators, one per sample, so a sample's noise never depends on its batch."""

    def __init__(self, seeds, device="cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def __call__(self, shape):
        # Drawn on the CPU whatever the device, so a seed gives the same image on any machine.
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]).to(self.device)


def old_guided(predict, labels, guidance):
    if labels is None or guidance == 1.0:
        return predict(labels).to(torch.float64)
    cond = predict(labels).to(torch.float64)
    uncond = predict(None).to(torch.float64)
    return uncond + guidance * (cond - uncond)


def old_denoise(model, x, sigma, labels, guidance):
    sig = sigma.expand(x.shape[0]).to(torch.float32)
    return old_guided(lambda lab: model(x.to(torch.float32), sig, lab), labels, guidance)


@torch.no_grad()
def old_heun_sample(model, latents, settings, labels=None, churn_noise=None):
    t_steps = edm.noise_levels(settings, latents.device)
    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = min(settings.s_churn / settings.num_steps, 2 ** 0.5 - 1) if settings.s_churn > 0 else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * churn_noise(x.shape).to(torch.float64)
        d_cur = settings.score_scale * (x - old_denoise(model, x, t_hat, labels, settings.guidance)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if i < settings.num_steps - 1:
            d_prime = settings.score_scale * (x_next - old_denoise(model, x_next, t_next, labels, settings.guidance)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x.to(torch.float32)


def old_generate(model, settings, image_shape, seeds, batch_size, labels=None, device="cpu"):
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        noise = OldPerSampleNoise(chunk, device)
        latents = noise((len(chunk), *image_shape))
        lab = None if labels is None else labels[start:start + batch_size].to(device)
        images = old_heun_sample(model, latents, settings, lab, churn_noise=noise)
        if not torch.isfinite(images).all():
            raise RuntimeError("non-finite images")
        out.append(to_uint8(images).cpu())
    return torch.cat(out)


def old_precision_recall(features, real_features, k=5):
    """models/metrics.precision_recall before chunking: dense float64 n x n distance matrices."""
    g = torch.from_numpy(np.asarray(features, dtype=np.float64))
    r = torch.from_numpy(np.asarray(real_features, dtype=np.float64))

    def kth_radius(x):
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    r_rad, g_rad = kth_radius(r), kth_radius(g)
    d = torch.cdist(g, r)
    return (d <= r_rad[None, :]).any(dim=1).double().mean().item(), (d <= g_rad[:, None]).any(dim=0).double().mean().item()


# ---- helpers ----

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_rss_mib() -> float | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # noqa: BLE001 (not on every platform)
        return None


class CallCounter:
    """Samples that pass through the network (a forward pre-hook), to turn FLOPs per sample into FLOP/s."""

    def __init__(self, model):
        self.samples = 0
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.samples += int(args[0].shape[0])
        self.calls += 1


def flops_per_sample(model, shape, label_dim, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    n = 4
    x = torch.zeros(n, *shape, device=device)
    sigma = torch.ones(n, device=device)
    labels = torch.zeros(n, dtype=torch.long, device=device) if label_dim else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, sigma, labels)
    return counter.get_total_flops() / n


def default_setup(params_path: Path, label_dim: int | None = None, guidance: float | None = None):
    raw = yaml.safe_load(params_path.read_text())
    cfg = {**raw["model"]["edm"], "image_shape": [1, 28, 28],
           "label_dim": raw["model"]["label_dim"] if label_dim is None else label_dim}
    sampler = dict(raw["sample"]["sampler"]["edm"])
    if guidance is not None:
        sampler["guidance"] = guidance
    return cfg, edm.HeunSettings(**sampler)


def build_model(cfg: dict, device: torch.device):
    torch.manual_seed(0)
    model = edm.build(cfg)
    with torch.no_grad():  # a fresh conv_out is zero: give the network an output that depends on it
        model.net.conv_out.weight.normal_(0, 0.05)
    return model.to(device).eval()


def _fits(model, shape, label_dim, device, b: int) -> bool:
    """Whether a guided step at batch b fits: the doubled forward pass next to the sampler's float64 state."""
    try:
        with torch.no_grad():
            state = torch.randn(4 * b, *shape, dtype=torch.float64, device=device)
            x = torch.randn(2 * b, *shape, device=device)
            lab = torch.zeros(2 * b, dtype=torch.long, device=device) if label_dim else None
            model(x, torch.ones(2 * b, device=device), lab)
            sync(device)
            del state
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def largest_batch(model, cfg: dict, device, start=2048) -> int:
    """The largest power-of-two batch whose guided step fits on the GPU, kept below 2^31 elements in
    the largest activation (the U-Net's first skip concatenation, 2 x channels[0] at full size, for the
    doubled batch), past which some CUDA kernels need 64-bit indexing or split the batch."""
    shape, label_dim = tuple(cfg["image_shape"]), cfg["label_dim"]
    per_sample = 2 * 2 * cfg["channels"][0] * shape[1] * shape[2]
    limit = 1 << int(math.log2((2 ** 31 - 1) // per_sample))
    best, b = 0, min(start, limit)
    while b <= limit:
        ok = _fits(model, shape, label_dim, device, b)
        torch.cuda.empty_cache()
        if not ok:
            break
        best, b = b, b * 2
    return best or max(start // 2, 1)


# ---- sections ----

def sampling_plan(args, device, model, cfg) -> list[tuple[int, int]]:
    """(batch size, batches) per measurement: --batch-sizes ('max' resolved on CUDA), --batches each;
    with --n, sizes above n shrink to n and each runs ceil(n / size) batches."""
    sizes = []
    for b in args.batch_sizes:
        if b == "max":
            if device.type == "cuda":
                sizes.append(largest_batch(model, cfg, device))
        else:
            sizes.append(int(b))
    if args.n:
        sizes = [min(b, args.n) for b in sizes]
    sizes = list(dict.fromkeys(sizes))  # in order, once each
    return [(b, -(-args.n // b) if args.n else args.batches) for b in sizes]


def bench_sampling(args, device, results, save):
    for variant in (["default", "guided"] if args.guided else ["default"]):
        over = GUIDED if variant == "guided" else {}
        cfg, settings = default_setup(args.params, over.get("label_dim", args.label_dim),
                                      over.get("guidance", args.guidance))
        model = build_model(cfg, device)
        shape = tuple(cfg["image_shape"])
        label_dim = cfg["label_dim"]
        fps = flops_per_sample(model, shape, label_dim, device)
        for b, batches in sampling_plan(args, device, model, cfg):
            seeds = list(range(b * batches))
            labels = class_labels(range(len(seeds)), label_dim)
            row = {"variant": variant, "batch_size": b, "batches": batches, "images": len(seeds),
                   "label_dim": label_dim, "guidance": settings.guidance, "num_steps": settings.num_steps}

            def run(name, n_seeds, bs, model=model, settings=settings, seeds=seeds, labels=labels):
                if name == "old":
                    return old_generate(model, settings, shape, seeds[:n_seeds], bs, labels, device)
                return generate(model, edm.FAMILY, settings, shape, seeds[:n_seeds], bs, labels, device)

            outputs = {}
            for name in ("old", "new"):
                # Warm-up, untimed: lazy initialisation and each shape's first-call setup (oneDNN on the
                # CPU: a whole batch; CUDA: 256 images, the large batch's first call costs little more).
                w = min(b, 256) if device.type == "cuda" else b
                run(name, w, w)
                if device.type == "cuda":  # each path grows the allocator's pool from empty
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                counter = CallCounter(model)
                try:
                    out, secs = timed(lambda name=name: run(name, len(seeds), b), device)
                finally:
                    counter.handle.remove()
                outputs[name] = out
                row[name] = {"seconds": secs, "images_per_s": len(seeds) / secs, "network_calls": counter.calls,
                             "flops_per_sample_call": fps, "achieved_flop_per_s": fps * counter.samples / secs}
                if device.type == "cuda":
                    row[name]["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            row["speedup"] = row["new"]["images_per_s"] / row["old"]["images_per_s"]
            diff = (outputs["new"].int() - outputs["old"].int()).abs()
            row["max_grey_level_diff_new_vs_old"] = int(diff.max())  # 0 on the CPU; CUDA draws other noise
            results["sampling"].append(row)
            save()
            print(f"sampling {variant:8s} batch {b:6d} x{batches}: old {row['old']['images_per_s']:9.1f} img/s "
                  f"({row['old']['network_calls']} calls, {row['old']['achieved_flop_per_s'] / 1e9:8.2f} GFLOP/s)  "
                  f"new {row['new']['images_per_s']:9.1f} img/s ({row['new']['network_calls']} calls, "
                  f"{row['new']['achieved_flop_per_s'] / 1e9:8.2f} GFLOP/s)  new/old {row['speedup']:.2f}x", flush=True)
        model = None  # free it before the next variant's
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_noise(args, device, results, save):
    shape = (1, 28, 28)
    sizes = sorted({int(b) for b in args.batch_sizes if b != "max"} | {args.noise_batch})
    methods = {"cpu_generators_copied": lambda seeds: PerSampleNoise(seeds, device, "generators")}
    if device.type == "cuda":
        def per_sample_cuda(seeds):
            gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            return lambda sh: torch.stack([torch.randn(tuple(sh[1:]), generator=g, device=device) for g in gens])
        methods["cuda_generator_per_sample"] = per_sample_cuda
    methods["philox_on_device"] = lambda seeds: PerSampleNoise(seeds, device, "philox")
    for b in sizes:
        seeds = list(range(b))
        row = {"batch_size": b}
        for name, make in methods.items():
            make(seeds[:8])((len(seeds[:8]), *shape))  # warm-up
            best = math.inf
            for _ in range(args.noise_repeats):
                _, secs = timed(lambda make=make: make(seeds)((b, *shape)), device)
                best = min(best, secs)
            row[name] = {"seconds": best, "us_per_sample": best / b * 1e6}
        results["noise"].append(row)
        save()
        print(f"noise batch {b:6d}: " + "  ".join(f"{k} {v['seconds'] * 1e3:8.2f} ms" for k, v in row.items()
                                                 if isinstance(v, dict)), flush=True)


def bench_inception(args, device, results, save):
    from models.errors import InputError
    from models.inception import InceptionFeatures

    directory = Path(args.inception_dir or tempfile.mkdtemp(prefix="inception-"))
    try:
        pil = InceptionFeatures(directory, device, resize="pil")
    except InputError as exc:
        print(f"inception: skipped ({exc})", flush=True)
        results["inception"].append({"skipped": str(exc)})
        return
    batched = InceptionFeatures(directory, device, resize="batched")
    n = args.inception_n
    bs = 250 if device.type == "cuda" else 50
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 28, 28), (3, 32, 32)):
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
        row = {"shape": list(shape), "images": n}
        batched(images[:bs])  # warm-up at the timed batch size (the CPU's oneDNN setup is shared by both)
        pil.resized(images[:2])
        feats = {}
        for name, ext in (("pil", pil), ("batched", batched)):
            _, resize_s = timed(lambda ext=ext: [ext.resized(images[a:a + bs]) for a in range(0, n, bs)], device)
            feats[name], secs = timed(lambda ext=ext: ext(images), device)
            row[name] = {"seconds": secs, "images_per_s": n / secs, "resize_images_per_s": n / resize_s}
        row["features_identical"] = bool(torch.equal(feats["pil"], feats["batched"]))
        row["features_max_abs_diff"] = float((feats["pil"] - feats["batched"]).abs().max())
        row["speedup"] = row["batched"]["images_per_s"] / row["pil"]["images_per_s"]
        results["inception"].append(row)
        save()
        print(f"inception {shape}: pil {row['pil']['images_per_s']:8.1f} img/s (resize "
              f"{row['pil']['resize_images_per_s']:8.1f})  batched {row['batched']['images_per_s']:8.1f} img/s "
              f"(resize {row['batched']['resize_images_per_s']:8.1f})  batched/pil {row['speedup']:.2f}x  "
              f"identical features: {row['features_identical']}", flush=True)


def bench_precision_recall(args, device, results, save):
    """Dense (old, CPU) against chunked (CPU, and CUDA) at the same n = min(--pr-n, --pr-dense-max), then
    the chunked computation on the device alone at --pr-n when that is larger."""
    rng = np.random.default_rng(0)
    g_all = rng.normal(size=(args.pr_n, 128))
    r_all = rng.normal(size=(args.pr_n, 128)) + 0.1
    cpu = torch.device("cpu")
    sizes = list(dict.fromkeys([min(args.pr_n, args.pr_dense_max), args.pr_n]))
    for n in sizes:
        g, r = g_all[:n], r_all[:n]
        row = {"n": n, "dim": 128}
        compare = n <= args.pr_dense_max
        if compare:
            out, secs = timed(lambda g=g, r=r: old_precision_recall(g, r), cpu)
            row["dense_cpu"] = {"seconds": secs, "precision_recall": out}
        if compare or device.type == "cpu":
            out, secs = timed(lambda g=g, r=r: metrics.precision_recall(g, r), cpu)
            row["chunked_cpu"] = {"seconds": secs, "precision_recall": out}
        if device.type == "cuda":
            metrics.precision_recall(g[:1000], r[:1000], device=device)  # warm-up
            torch.cuda.reset_peak_memory_stats(device)
            out, secs = timed(lambda g=g, r=r: metrics.precision_recall(g, r, device=device), device)
            row["chunked_cuda"] = {"seconds": secs, "precision_recall": out,
                                   "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20}
        if compare:
            row["chunked_equals_dense"] = row["chunked_cpu"]["precision_recall"] == row["dense_cpu"]["precision_recall"]
        results["precision_recall"].append(row)
        save()
        timings = {k: v["seconds"] for k, v in row.items() if isinstance(v, dict)}
        base_name = "dense_cpu" if compare else next(iter(timings))
        print(f"precision/recall n={n}: " + "  ".join(f"{k} {v:.3f} s" for k, v in timings.items())
              + f"   (speed vs {base_name}: " + ", ".join(f"{k} {timings[base_name] / v:.2f}x" for k, v in timings.items())
              + ")", flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--batch-sizes", help="comma-separated; 'max' = largest that fits on the GPU "
                   "(default 256,2500,max on CUDA, 64,256 on the CPU)")
    p.add_argument("--batches", type=int, default=1, help="timed batches per batch size (without --n)")
    p.add_argument("--n", type=int, help="images per sampling measurement (sizes above it shrink to it, each size "
                   "runs ceil(n / size) batches), and the sample count of the Inception and precision/recall "
                   "timings (default 1000 and 50000 on CUDA, 100 and 5000 on the CPU)")
    p.add_argument("--pr-dense-max", type=int, default=10000, help="largest n the old dense precision/recall "
                   "(and the CPU's chunked one) runs at; above it only the device's chunked one runs")
    p.add_argument("--label-dim", type=int, help="default: params.yaml model.label_dim")
    p.add_argument("--guidance", type=float, help="default: params.yaml sample.sampler.edm.guidance")
    p.add_argument("--no-guided", dest="guided", action="store_false", help=f"skip the guided variant {GUIDED}")
    p.add_argument("--noise-batch", type=int, default=2500, help="a batch size the noise timing always includes")
    p.add_argument("--noise-repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["sampling", "noise", "inception", "pr"])
    p.add_argument("--inception-dir", help="where clean-fid's Inception file is written (default: a temp dir)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    cuda = args.device == "cuda"
    args.batch_sizes = (args.batch_sizes or ("256,2500,max" if cuda else "64,256")).split(",")
    for b in args.batch_sizes:
        if b != "max" and not (b.isdigit() and int(b) > 0):
            p.error(f"--batch-sizes: {b!r} is neither a positive integer nor 'max'")
    args.inception_n = args.n or (1000 if cuda else 100)
    args.pr_n = max(args.n or (50000 if cuda else 5000), 12)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "argv": sys.argv[1:] if argv is None else argv}
    print(f"bench/sample.py on {args.device} ({info['device']}), torch {info['torch']}, "
          f"{info['threads']} CPU threads", flush=True)
    results = {"info": info, "sampling": [], "noise": [], "precision_recall": [], "inception": [], "errors": []}
    t0 = time.perf_counter()

    def save():  # after every measurement, so a run stopped from outside keeps what it measured
        info["seconds"] = time.perf_counter() - t0
        info["peak_rss_mib"] = peak_rss_mib()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(args.json)

    sections = [("sampling", bench_sampling), ("noise", bench_noise), ("pr", bench_precision_recall),
                ("inception", bench_inception)]  # the slowest (clean-fid's CPU resize) last
    for name, fn in sections:
        if name in args.skip:
            continue
        try:
            fn(args, device, results, save)
        except Exception as exc:  # noqa: BLE001 (a one-shot run keeps the other sections' numbers)
            traceback.print_exc()
            results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"{name}: FAILED ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save()
    if args.json:
        print(f"wrote {args.json}", flush=True)
    print(f"done in {info['seconds']:.1f} s; {len(results['errors'])} section(s) failed", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
