"""Benchmark of the streaming Neon merge (`models.merge.merge_files`) against the obvious alternatives.

    .venv/bin/python bench/merge.py                         # a 2 GB fp32 pair (the default --size-gb 2)
    .venv/bin/python bench/merge.py --size-gb 0.05 --skip-mergekit   # seconds: a smoke run

On a generated pair of fp32 checkpoints shaped like a transformer (token/position embeddings, per
layer q/k/v/o projections, a 4x MLP, two LayerNorms, a final norm and an output head: hundreds of
tensors), it times, each in its own process, with the page cache warm (both inputs read just before):

  cp          `cp` of both inputs (the floor: read 2 models, write 2)
  ours 1w     merge_files for one weight
  ours 5w     merge_files for five weights, in one pass
  naive       checkpoint.read both (safetensors load_file), models.merge.merge, checkpoint.save (save_file):
              what the merge stage did per weight before merge_files
  mergekit    mergekit 0.1.5's `mergekit-pytorch` (raw safetensors state dicts): task_arithmetic,
              base_model = base, the self-trained model at weight -w, normalize: false

A sampler thread reads /proc/<pid>/status every 5 ms for the peak RssAnon and RssFile; VmHWM, the
kernel's own high-water mark of the total RSS (its last sample), cross-checks them (wait4's
ru_maxrss cannot: Linux folds the forking parent's RSS into it). `wall` is the whole process (interpreter and
imports included), `work` what the process measured itself after its imports. Nobody fsyncs inside
the timed region (cp, safetensors' save_file, mergekit and merge_files all leave writeback to the
kernel); `+sync` is the `sync` that follows, untimed in `wall`, so wall + sync is time to disk.

The outputs are checked, and the script exits 1 if a check fails: ours vs naive bit-identical (and
the same file bytes), each of the five weights bit-identical to the in-memory `merge` (torch),
ours vs mergekit within float tolerance (max abs difference printed). Targets (printed, exit 0 unless
--strict): one weight within 2x the `cp`; >= 3x faster than naive and mergekit; five weights under 2x
one; ours' RssAnon under 300 MB.

mergekit is run from its own virtualenv (`--mergekit-python`, default .venv-bench/bin/python): see
requirements-bench.txt for the install command. Inputs are kept in --workdir for the next run
(`--clean` deletes them at the end); outputs are deleted as soon as they are checked.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1 << 20
WEIGHTS5 = [0.5, 1.0, 1.5, 2.0, 3.0]
TARGETS = {"cp_ratio": 2.0, "speedup": 3.0, "five_ratio": 2.0, "rss_anon_mb": 300}


# ---------------------------------------------------------------------------------------------------
# children: each measured case runs in its own process and prints one JSON line last
# ---------------------------------------------------------------------------------------------------

def child_ours(base: str, other: str, out_dir: str, weights: list[float]) -> dict:
    t0 = time.perf_counter()
    from models.merge import merge_files
    t1 = time.perf_counter()
    targets = {w: Path(out_dir) / f"w={w:g}.safetensors" for w in weights}
    merge_files(base, other, targets, other_name=other)
    return {"import_s": t1 - t0, "work_s": time.perf_counter() - t1, "torch_imported": "torch" in sys.modules}


def child_naive(base: str, other: str, out_dir: str, weights: list[float]) -> dict:
    t0 = time.perf_counter()
    from models import checkpoint
    from models.merge import merge
    t1 = time.perf_counter()
    b, meta = checkpoint.read(base)
    o, _ = checkpoint.read(other)
    family, config = checkpoint.config_of(meta, base)
    for w in weights:
        merged = merge(b, o, w, other_name=other)
        out = Path(out_dir) / f"w={w:g}.safetensors"
        checkpoint.save(out, merged, family, config, extra={"neon_w": repr(float(w))})
    return {"import_s": t1 - t0, "work_s": time.perf_counter() - t1}


def child_mergekit(config: str, out_dir: str) -> dict:
    t0 = time.perf_counter()
    from mergekit.scripts.merge_raw_pytorch import main
    t1 = time.perf_counter()
    main([config, out_dir], standalone_mode=False)
    return {"import_s": t1 - t0, "work_s": time.perf_counter() - t1}


def run_child(argv: list[str]) -> None:
    kind, args = argv[0], json.loads(argv[1])
    result = {"ours": child_ours, "naive": child_naive, "mergekit": child_mergekit}[kind](**args)
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------
# measuring a process
# ---------------------------------------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


class Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.005):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for key, value in _status(self.pid).items():
                self.peak[key] = max(self.peak[key], value)
            self.samples += 1
            self.stop.wait(self.interval)


def measure(name: str, cmd: list[str], log_dir: Path, env: dict | None = None) -> dict:
    with open(log_dir / f"{name}.out", "w+") as out, open(log_dir / f"{name}.err", "w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, _ = os.wait4(proc.pid, 0)  # reaped here, so that the sampler's last reads were of a live process
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        t1 = time.perf_counter()
        os.sync()
        sync_s = time.perf_counter() - t1
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}: {' '.join(cmd)}\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    inner = json.loads(lines[-1]) if lines else {}
    return {"name": name, "wall_s": wall, "sync_s": sync_s, "work_s": inner.get("work_s"), "inner": inner,
            "rss_anon": sampler.peak["RssAnon"], "rss_file": sampler.peak["RssFile"], "vm_hwm": sampler.peak["VmHWM"],
            "samples": sampler.samples}


def warm(paths: list[Path]) -> None:
    """Read the inputs once so that every case starts with them in the page cache."""
    buf = bytearray(16 * MB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------

def model_shapes(size_bytes: int) -> tuple[dict[str, tuple[int, ...]], dict]:
    """A GPT-like stack of about `size_bytes` of fp32 (at least 2 layers)."""
    d = 1024
    while d > 32 and 8 * 12 * d * d * 4 > size_bytes:
        d //= 2
    vocab = max(64, min(32000, int(size_bytes * 0.12 / (2 * d * 4))))
    ctx = min(2048, max(16, vocab // 4))
    head = {"embed_tokens.weight": (vocab, d), "embed_positions.weight": (ctx, d)}
    per_layer = {"ln_1.weight": (d,), "ln_1.bias": (d,),
                 "attn.q_proj.weight": (d, d), "attn.q_proj.bias": (d,), "attn.k_proj.weight": (d, d),
                 "attn.k_proj.bias": (d,), "attn.v_proj.weight": (d, d), "attn.v_proj.bias": (d,),
                 "attn.o_proj.weight": (d, d), "attn.o_proj.bias": (d,),
                 "ln_2.weight": (d,), "ln_2.bias": (d,),
                 "mlp.fc_in.weight": (4 * d, d), "mlp.fc_in.bias": (4 * d,),
                 "mlp.fc_out.weight": (d, 4 * d), "mlp.fc_out.bias": (d,)}
    tail = {"ln_f.weight": (d,), "ln_f.bias": (d,), "lm_head.weight": (vocab, d)}

    def numel(shapes: dict) -> int:
        return sum(math.prod(s) for s in shapes.values())

    layers = max(2, (size_bytes // 4 - numel(head) - numel(tail)) // numel(per_layer))
    shapes = dict(head)
    for i in range(layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes.update(tail)
    return shapes, {"d_model": d, "layers": int(layers), "vocab": vocab, "context": ctx}


def generate(base: Path, other: Path, size_bytes: int, seed: int = 0) -> dict:
    """Base weights ~ N(0, 0.02^2) (norm weights ~1), the self-trained ones base + N(0, 0.001^2)."""
    import numpy as np

    from models import checkpoint

    shapes, config = model_shapes(size_bytes)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 23, dtype=np.float32)  # reused with shifting offsets: fast, still irregular
    specs = {name: ("F32", shape) for name, shape in shapes.items()}
    meta = checkpoint.metadata_for("bench", config)
    step = 1 << 22
    with checkpoint.open_writer(base, specs, meta, None) as wb, checkpoint.open_writer(other, specs, meta, None) as wo:
        k = 0
        for name in wb.order:
            n = int(np.prod(shapes[name]))
            for s in range(0, n, step):
                m = min(step, n - s)
                k = (k * 7919 + 104729) % (len(pool) - step)
                b = pool[k:k + m] * np.float32(0.02)
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    b += np.float32(1.0)
                k2 = (k * 31 + 12345) % (len(pool) - step)
                o = b + pool[k2:k2 + m] * np.float32(0.001)
                wb.write(name, b, s)
                wo.write(name, o, s)
    return {**config, "tensors": len(shapes)}


def mergekit_config(path: Path, base: Path, other: Path, w: float) -> None:
    # task arithmetic: base + sum_i weight_i * (model_i - base) = base - w * (other - base) for weight -w
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {other}\n"
                    f"    parameters:\n      weight: {-w!r}\nparameters:\n  normalize: false\ndtype: float32\n")


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MB)
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def compare(a_path: Path, b_path: Path) -> tuple[bool, float]:
    """(bit-identical tensors, max |a - b|) of two checkpoints with the same tensors."""
    import numpy as np

    from models import checkpoint

    identical, max_diff = True, 0.0
    with checkpoint.open_checkpoint(a_path) as a, checkpoint.open_checkpoint(b_path) as b:
        if set(a.tensors) != set(b.tensors):
            return False, float("inf")
        for name in a.tensors:
            if a.tensors[name].shape != b.tensors[name].shape or a.tensors[name].dtype != b.tensors[name].dtype:
                return False, float("inf")
            x, y = a.array(name).reshape(-1), b.array(name).reshape(-1)
            for s in range(0, x.size, 1 << 22):
                xs, ys = x[s:s + (1 << 22)], y[s:s + (1 << 22)]
                if identical and xs.view(np.uint8).tobytes() != ys.view(np.uint8).tobytes():
                    identical = False
                if x.dtype.kind == "f":
                    max_diff = max(max_diff, float(np.max(np.abs(xs.astype(np.float64) - ys))) if xs.size else 0.0)
            a.release(name)
            b.release(name)
    return identical, max_diff


def check_in_memory(base: Path, other: Path, out: Path, w: float) -> bool:
    """Every tensor of `out` bit-identical to the in-memory `merge` (torch), tensor by tensor."""
    import torch

    from models import checkpoint
    from models.merge import merge

    with checkpoint.open_checkpoint(base) as b, checkpoint.open_checkpoint(other) as o, \
            checkpoint.open_checkpoint(out) as m:
        for name in b.tensors:
            ref = merge({name: b.tensor(name)}, {name: o.tensor(name)}, w)[name]
            got = m.tensor(name)
            if ref.dtype != got.dtype or ref.shape != got.shape or \
                    not torch.equal(ref.reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)):
                return False
            for r in (b, o, m):
                r.release(name)
    return True


def output_file(out_dir: Path) -> Path:
    """The one checkpoint a tool wrote in `out_dir` (a single file, or a shard index)."""
    index = sorted(out_dir.glob("*.safetensors.index.json"))
    if index:
        return index[0]
    files = sorted(out_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one checkpoint in {out_dir}, found {[f.name for f in files]}")
    return files[0]


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

def find_mergekit(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    bench_venv = ROOT / ".venv-bench" / "bin" / "python"
    if bench_venv.exists():
        return str(bench_venv)
    return sys.executable if importlib.util.find_spec("mergekit") else None


def fmt_row(cells: list, widths: list[int]) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        run_child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of each input checkpoint (GB, 10^9 bytes)")
    ap.add_argument("--weights", type=float, nargs="+", default=WEIGHTS5, help="the five (or N) weights of `ours 5w`")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merge-bench")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each case; the table shows the fastest (all are listed)")
    ap.add_argument("--skip-mergekit", action="store_true", help="for machines without mergekit")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--mergekit-python", help="python of a virtualenv with mergekit (default: .venv-bench/bin/python)")
    ap.add_argument("--regenerate", action="store_true", help="write the inputs even if they exist")
    ap.add_argument("--clean", action="store_true", help="delete the inputs at the end")
    ap.add_argument("--strict", action="store_true", help="also exit 1 when a performance target is missed")
    args = ap.parse_args(argv)

    size = int(args.size_gb * 1e9)
    w1 = args.weights[0]
    mk_python = None if args.skip_mergekit else find_mergekit(args.mergekit_python)
    if not args.skip_mergekit and mk_python is None:
        print("mergekit not found: install it as requirements-bench.txt says, or pass --skip-mergekit", file=sys.stderr)
        return 2
    work = args.workdir / f"size-{size}"
    work.mkdir(parents=True, exist_ok=True)
    need = (2 + max(len(args.weights), 2)) * size + 2 * size * (not (work / "base.safetensors").exists())
    free = shutil.disk_usage(work).free
    if free < need * 1.05:
        print(f"{work}: {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    base, other = work / "base.safetensors", work / "selftrained.safetensors"
    info_path = work / "inputs.json"
    if args.regenerate or not (base.exists() and other.exists() and info_path.exists()):
        t = time.perf_counter()
        info = generate(base, other, size)
        info_path.write_text(json.dumps(info))
        print(f"generated {base} and {other} in {time.perf_counter() - t:.1f}s", flush=True)
    info = json.loads(info_path.read_text())
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    in_bytes = base.stat().st_size
    print(f"inputs: 2 x {in_bytes / 1e9:.2f} GB fp32, {info['tensors']} tensors (d_model {info['d_model']}, "
          f"{info['layers']} layers, vocab {info['vocab']}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    py = sys.executable
    script = str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results: dict[str, list[dict]] = {}
    checks: list[tuple[str, bool, str]] = []

    def out_dir(name: str) -> Path:
        d = work / f"out-{name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        return d

    def run(name: str, cmd_for, check=None) -> None:
        for i in range(args.repeat):
            d = out_dir(name)
            warm([base, other])
            os.sync()
            r = measure(name, cmd_for(d), logs, env)
            results.setdefault(name, []).append(r)
            print(f"  {name} run {i + 1}: wall {r['wall_s']:.2f}s, work {r['work_s'] or 0:.2f}s, "
                  f"+sync {r['sync_s']:.2f}s, RssAnon {r['rss_anon'] / MB:.0f} MB", flush=True)
            if check is not None and i == args.repeat - 1:
                check(d)
            shutil.rmtree(d, ignore_errors=True)

    ours1_digest = {}

    def child(kind: str, **kw) -> list[str]:
        args_json = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})
        return [py, script, "--child", kind, args_json]

    # cp of both inputs: the floor for reading two models and writing two
    run("cp", lambda d: ["cp", str(base), str(other), str(d)])

    ref_dir = work / "ref-ours1"
    shutil.rmtree(ref_dir, ignore_errors=True)

    def keep_ours1(d: Path) -> None:
        out = output_file(d)
        ours1_digest["sha"] = sha256(out)
        ref_dir.mkdir()
        out.rename(ref_dir / out.name)
        ok = check_in_memory(base, other, ref_dir / out.name, w1)
        checks.append((f"ours 1w (w={w1:g}) vs in-memory merge(): bit-identical", ok, ""))

    run("ours 1w", lambda d: child("ours", base=base, other=other, out_dir=d, weights=[w1]), keep_ours1)
    ref = ref_dir / f"w={w1:g}.safetensors"

    if not args.skip_naive:
        def check_naive(d: Path) -> None:
            out = output_file(d)
            same_bytes = sha256(out) == ours1_digest["sha"]
            identical, diff = compare(ref, out)
            checks.append(("ours 1w vs naive: bit-identical tensors", identical, f"max abs diff {diff:.3g}"))
            checks.append(("ours 1w vs naive: identical file bytes", same_bytes, ""))
        run("naive", lambda d: child("naive", base=base, other=other, out_dir=d, weights=[w1]), check_naive)

    if mk_python:
        cfg = work / "mergekit.yml"
        mergekit_config(cfg, base, other, w1)

        def check_mergekit(d: Path) -> None:
            out = output_file(d)
            identical, diff = compare(ref, out)
            ok = diff <= 1e-6  # |w * delta| is ~0.0015 here: fp32 rounding differences would be ~1e-10
            checks.append(("ours 1w vs mergekit: within 1e-6", ok,
                           f"max abs diff {diff:.3g}" + (", bit-identical" if identical else "")))
        run("mergekit", lambda d: [mk_python, script, "--child", "mergekit",
                                   json.dumps({"config": str(cfg), "out_dir": str(d)})], check_mergekit)

    shutil.rmtree(ref_dir, ignore_errors=True)  # keep the disk peak at inputs + five outputs

    def check_five(d: Path) -> None:
        same = sha256(d / f"w={w1:g}.safetensors") == ours1_digest["sha"]
        checks.append((f"ours 5w (w={w1:g}) vs ours 1w: identical file bytes", same, ""))
        for w in args.weights[1:]:
            ok = check_in_memory(base, other, d / f"w={w:g}.safetensors", w)
            checks.append((f"ours 5w (w={w:g}) vs in-memory merge(): bit-identical", ok, ""))

    run(f"ours {len(args.weights)}w", lambda d: child("ours", base=base, other=other, out_dir=d,
                                                      weights=list(args.weights)), check_five)

    # ---- table -------------------------------------------------------------------------------------
    best = {name: min(rs, key=lambda r: r["wall_s"]) for name, rs in results.items()}
    print()
    print(f"merge benchmark: 2 x {in_bytes / 1e9:.2f} GB fp32 inputs, {info['tensors']} tensors; "
          f"w = {w1:g} (1w) and {', '.join(f'{w:g}' for w in args.weights)} ({len(args.weights)}w); "
          f"best of {args.repeat}; page cache warm; no fsync in wall")
    widths = [10, 8, 8, 8, 12, 12, 10]
    print(fmt_row(["case", "wall s", "work s", "+sync s", "RssAnon MB", "RssFile MB", "VmHWM MB"], widths))
    for name, r in best.items():
        print(fmt_row([name, f"{r['wall_s']:.2f}", "-" if r["work_s"] is None else f"{r['work_s']:.2f}",
                       f"{r['sync_s']:.2f}", f"{r['rss_anon'] / MB:.0f}", f"{r['rss_file'] / MB:.0f}",
                       f"{r['vm_hwm'] / MB:.0f}"], widths))
    if args.repeat > 1:
        for n, rs in results.items():
            walls = [r["wall_s"] for r in rs]
            print(f"  {n}: wall s of each run {', '.join(f'{x:.2f}' for x in walls)} "
                  f"(median {statistics.median(walls):.2f})")

    five = f"ours {len(args.weights)}w"
    o1 = best["ours 1w"]["wall_s"]
    targets = [(f"ours 1w / cp of both inputs = {o1 / best['cp']['wall_s']:.2f} (target <= {TARGETS['cp_ratio']:g})",
                o1 / best["cp"]["wall_s"] <= TARGETS["cp_ratio"])]
    for other_name in ("naive", "mergekit"):
        if other_name in best:
            x = best[other_name]["wall_s"] / o1
            by_work = (best[other_name]["work_s"] or 0) / (best["ours 1w"]["work_s"] or 1)
            text = f"{other_name} / ours 1w = {x:.2f}x (target >= {TARGETS['speedup']:g}x); by work time {by_work:.2f}x"
            targets.append((text, x >= TARGETS["speedup"]))
    x = best[five]["wall_s"] / o1
    targets.append((f"{five} / ours 1w = {x:.2f} (target < {TARGETS['five_ratio']:g})", x < TARGETS["five_ratio"]))
    anon = max(best["ours 1w"]["rss_anon"], best[five]["rss_anon"]) / MB
    targets.append((f"ours peak RssAnon = {anon:.0f} MB (target < {TARGETS['rss_anon_mb']} MB)",
                    anon < TARGETS["rss_anon_mb"]))
    torch_free = all(not r["inner"].get("torch_imported", False) for n in ("ours 1w", five) for r in results[n])
    print("\ntargets:" + ("" if size >= 1e9 else " (set for the default --size-gb 2: at this size start-up dominates)"))
    for text, ok in targets:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    print(f"  (ours never imported torch: {torch_free})")
    print("\nchecks:")
    for text, ok, note in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {text}" + (f" ({note})" if note else ""))
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    failed = [c for c in checks if not c[1]]
    if failed:
        print(f"\n{len(failed)} output check(s) FAILED", file=sys.stderr)
        return 1
    if args.strict and not all(ok for _, ok in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
