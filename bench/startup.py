"""The fixed cost of a stage process: what `python -m flows STAGE` spends before and after the stage's own work.

    python bench/startup.py --workspace /tmp/ws                 # fetch, 5 runs each, in an up-to-date workspace
    python bench/startup.py --workspace /tmp/before --workspace /tmp/after --repeat 5 --json out.json
    python bench/startup.py --workspace /tmp/ws --stage merge

A workspace is a checkout whose `dvc repro` has run (tiny params are enough: `fetch` copies and verifies the
locally trained base, which takes milliseconds), with a local Prefect server up (`neon prefect up`); the
stage runs with that workspace's own code (`python -m flows` imports from the current directory), so two
copies of one workspace, one with older code, compare two versions in one invocation. To make one:
    git clone -q . /tmp/ws && cd /tmp/ws && ln -s $OLDPWD/.venv .venv && cp tests/tiny_params.yaml params.yaml
    source .venv/bin/activate && neon prefect up && dvc repro

For each workspace it prints:
  - the wall time (median of --repeat runs) and CPU time of the real `python -m flows STAGE`, next to
    `python -c pass`, `python -c "import torch"` and `python -c "import prefect"` timed in the same session,
    and the target (< 5 s);
  - the phases of one stage process (median over --repeat runs of a probe that runs the workspace's
    flows/__main__.py through runpy, with timestamps around its parts and the time spent in import
    statements): interpreter start, imports, params, flow-run creation (Prefect client, POST /flow_runs/),
    engine set-up until the stage's body starts, the body, its manifest writing (the `artifact` context's
    exit), the flow run's end (final state, heartbeat thread, log flush) and process exit (atexit handlers,
    interpreter teardown), plus the number of synchronous Prefect API requests;
  - the heaviest imports (`python -X importtime -m flows STAGE`, self time summed by top-level package).

The machine is shared: compare numbers from one invocation only, and prefer medians of several runs.

Measured 2026-11-27 (2 cores shared with other jobs, load average ~4; --repeat 5, fetch of the tiny preset),
before -> after the start-up work in flows/ (lazy Prefect, GC paused during imports and frozen at exit, the
flow run created with pydantic-serialised parameters, a heartbeat thread that stops at once):
`python -m flows fetch` 7.46 s -> 2.94 s wall (3.77 -> 2.36 s CPU), against `python -c "import torch"` 2.70 s;
flow-run end 0.93 -> 0.04 s, exit 1.10 -> 0.38 s, imports ~3.9 -> ~2.0 s.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TARGET_S = 5.0

# Runs inside the stage process: the workspace's real `python -m flows STAGE` (flows/__main__.py, by runpy), with
# timestamps around its parts (time.time(), so the parent can relate them to when it spawned the process)
# and the time spent in import statements, per phase. argv: STAGE OUT.json
PROBE = r"""
import time
_T = {"interpreter": time.time()}
import atexit, builtins, contextlib, importlib, importlib.abc, json, runpy, sys, threading
stage, out = sys.argv[1], sys.argv[2]
_REQ = {"n": 0, "s": 0.0}
_IMP = []  # (start, end) of each outermost import in the main thread
def _dump():
    _T.setdefault("exit start", time.time())
    with open(out, "w") as f:
        json.dump({"marks": _T, "requests": _REQ, "imports": _IMP}, f)
atexit.register(_dump)  # registered first: runs after the atexit handlers registered later (Prefect's)

_main, _depth = threading.get_ident(), [0]
def _timed_import(fn):
    def wrapped(*a, **k):
        if threading.get_ident() != _main:
            return fn(*a, **k)
        _depth[0] += 1
        t = time.time()
        try:
            return fn(*a, **k)
        finally:
            _depth[0] -= 1
            if not _depth[0] and time.time() - t > 1e-4:
                _IMP.append((t, time.time()))
    return wrapped
builtins.__import__ = _timed_import(builtins.__import__)
importlib.import_module = _timed_import(importlib.import_module)

def _patch_entry(entry):
    import httpx
    def _count(send):
        def wrapped(self, *a, **k):
            t = time.time()
            try:
                return send(self, *a, **k)
            finally:
                _REQ["n"] += 1
                _REQ["s"] += time.time() - t
        return wrapped
    httpx.Client.send = _count(httpx.Client.send)

    main = entry.main
    def timed_main(*a, **k):
        _T["main start"] = time.time()
        try:
            return main(*a, **k)
        finally:
            _T["exit start"] = time.time()
    entry.main = timed_main

    load = entry.load
    def timed_load(*a, **k):
        _T["params start"] = time.time()
        try:
            return load(*a, **k)
        finally:
            _T["params end"] = time.time()
    entry.load = timed_load

    run_stage_flow = entry.run_stage_flow
    def timed_run_stage_flow(*a, **k):
        _T["flow start"] = time.time()
        from prefect.client.orchestration import SyncPrefectClient
        create = SyncPrefectClient.create_flow_run
        def create_flow_run(self, *a, **k):
            try:
                return create(self, *a, **k)
            finally:
                _T["flow run created"] = time.time()
        SyncPrefectClient.create_flow_run = create_flow_run
        try:
            return run_stage_flow(*a, **k)
        finally:
            _T["flow end"] = time.time()
    entry.run_stage_flow = timed_run_stage_flow

    module_name, call = entry.RUNNERS[stage]
    def body(module, params):
        if hasattr(module, "artifact"):
            artifact = module.artifact
            @contextlib.contextmanager
            def timed_artifact(*a, **k):
                with artifact(*a, **k) as o:
                    yield o
                    _T["manifest start"] = time.time()
                _T["manifest end"] = time.time()
            module.artifact = timed_artifact
        _T["body start"] = time.time()
        try:
            return call(module, params)
        finally:
            _T["body end"] = time.time()
    entry.RUNNERS[stage] = (module_name, body)

class _AfterImport(importlib.abc.MetaPathFinder):
    # marks when `flows` has been imported, and patches `flows.stages` as soon as it has been
    def find_spec(self, name, path, target=None):
        if name not in ("flows", "flows.stages"):
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if finder is not self and hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module
        def exec_and_mark(module):
            exec_module(module)
            if name == "flows":
                _T["import flows"] = time.time()
            else:
                _patch_entry(module)
        spec.loader.exec_module = exec_and_mark
        return spec
sys.meta_path.insert(0, _AfterImport())
sys.argv = ["flows", stage]
runpy.run_module("flows", run_name="__main__", alter_sys=True)
"""

# (label, end mark, start mark): each phase is end - start; "spawn" and "end" are the parent's clock.
PHASES = [
    ("interpreter start", "interpreter", "spawn"),
    ("import flows (Prefect settings, server discovery)", "import flows", "interpreter"),
    ("imports of the entry point (flows.stages)", "main start", "import flows"),
    ("params.yaml", "params end", "params start"),
    ("Prefect flow-run creation (client, POST /flow_runs/)", "flow run created", "flow start"),
    ("engine set-up until the stage body starts", "body start", "flow run created"),
    ("stage body (without its manifest)", "manifest start", "body start"),
    ("manifest writing", "manifest end", "manifest start"),
    ("stage body after the manifest", "body end", "manifest end"),
    ("flow-run end (final state, heartbeat, logs)", "flow end", "body end"),
    ("main() after the flow run", "exit start", "flow end"),
    ("exit (atexit, teardown)", "end", "exit start"),
]


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float, float, float, int]:
    """(spawn time, end time, wall s, CPU s of the child, exit code) of one command."""
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr.decode()[-3000:]}\n")
    return start, start + wall, wall, usage.ru_utime + usage.ru_stime, proc.returncode


def probe(stage: str, cwd: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "marks.json"
        spawn, end, wall, cpu, code = timed([sys.executable, "-c", PROBE, stage, str(out)], cwd)
        if code:
            raise SystemExit(f"the probe of {stage} failed in {cwd}")
        data = json.loads(out.read_text())
    marks = {"spawn": spawn, "end": end, **data["marks"]}
    phases, imports = {}, {}
    for label, b, a in PHASES:
        if a in marks and b in marks:
            phases[label] = marks[b] - marks[a]
            imports[label] = sum(max(0.0, min(e, marks[b]) - max(s, marks[a])) for s, e in data["imports"])
    return {"phases": phases, "imports": imports, "wall": wall, "cpu": cpu, "requests": data["requests"]["n"],
            "request_s": data["requests"]["s"]}


def heavy_imports(stage: str, cwd: Path, top: int) -> list[tuple[str, float]]:
    """Self import time summed by top-level package, from `python -X importtime -m flows STAGE`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows", stage], cwd=cwd, capture_output=True,
                          text=True, check=False)
    total: dict[str, float] = defaultdict(float)
    for line in proc.stderr.splitlines():
        if m := re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line):
            total[m[2].split(".")[0]] += int(m[1]) / 1e6
    return sorted(total.items(), key=lambda kv: -kv[1])[:top]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", action="append", type=Path,
                        help="an up-to-date checkout to run the stage in (repeatable; default: the current directory)")
    parser.add_argument("--stage", default="fetch")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--top", type=int, default=12, help="how many packages in the import table")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    workspaces = [w.resolve() for w in (args.workspace or [Path.cwd()])]
    for w in workspaces:
        if not (w / "dvc.yaml").is_file():
            parser.error(f"{w} holds no dvc.yaml")

    python = sys.executable
    baselines = {"python -c pass": [python, "-c", "pass"],
                 'python -c "import torch"': [python, "-c", "import torch"],
                 'python -c "import prefect"': [python, "-c", "import prefect; from prefect import flow"]}
    runs: dict[str, dict[str, list]] = {name: {"wall": [], "cpu": []} for name in baselines}
    probes: dict[Path, list[dict]] = {w: [] for w in workspaces}
    full = {w: {"wall": [], "cpu": []} for w in workspaces}
    for w in workspaces:  # warm the file cache and the workspaces' __pycache__ once, untimed
        timed([python, "-m", "flows", args.stage], w)
    for _ in range(args.repeat):  # interleaved, so a burst of load on the shared machine hits every column alike
        for name, cmd in baselines.items():
            _, _, wall, cpu, _ = timed(cmd, workspaces[0])
            runs[name]["wall"].append(wall)
            runs[name]["cpu"].append(cpu)
        for w in workspaces:
            _, _, wall, cpu, code = timed([python, "-m", "flows", args.stage], w)
            if code:
                return code
            full[w]["wall"].append(wall)
            full[w]["cpu"].append(cpu)
            probes[w].append(probe(args.stage, w))

    names = [str(w) for w in workspaces]
    width = max(52, *(len(n) for n in names))
    print(f"\nstart-up of `python -m flows {args.stage}`: median of {args.repeat} runs (wall s / CPU s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'command':<{width}} {'wall s':>8} {'CPU s':>8}")
    for name, r in runs.items():
        print(f"{name:<{width}} {median(r['wall']):8.2f} {median(r['cpu']):8.2f}")
    for w, n in zip(workspaces, names):
        wall = median(full[w]["wall"])
        verdict = "meets" if wall < TARGET_S else "misses"
        print(f"{('python -m flows ' + args.stage + ' in ' + n):<{width}} {wall:8.2f} {median(full[w]['cpu']):8.2f}"
              f"   {verdict} the target < {TARGET_S:g} s")

    print(f"\nphases of one stage process (probe: the workspace's flows/__main__.py with timestamps; median s over "
          f"{args.repeat} runs; 'imp': of which in import statements)")
    print(f"{'phase':<{width}}" + "".join(f" {'#' + str(i + 1) + ' s':>8} {'imp':>6}" for i in range(len(workspaces))))
    for label, _, _ in PHASES:
        cells = [(median([p["phases"][label] for p in probes[w] if label in p["phases"]]),
                  median([p["imports"][label] for p in probes[w] if label in p["imports"]])) for w in workspaces]
        print(f"{label:<{width}}" + "".join(f" {c:8.3f} {i:6.2f}" for c, i in cells))
    print(f"{'total (probe wall)':<{width}}" + "".join(f" {median([p['wall'] for p in probes[w]]):8.3f} {'':6}"
                                                       for w in workspaces))
    print(f"{'Prefect API requests (count / s spent)':<{width}}" + "".join(
        f" {int(median([p['requests'] for p in probes[w]])):>8} {median([p['request_s'] for p in probes[w]]):6.2f}"
        for w in workspaces))
    for i, n in enumerate(names):
        print(f"  #{i + 1}: {n}")

    imports = {}
    for i, w in enumerate(workspaces):
        imports[str(w)] = heavy_imports(args.stage, w, args.top)
        print(f"\nheaviest imports in #{i + 1} (python -X importtime -m flows {args.stage}; self time by package, s)")
        for pkg, s in imports[str(w)]:
            print(f"  {pkg:<28} {s:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "stage": args.stage, "repeat": args.repeat, "target_s": TARGET_S,
            "baselines": {k: {"wall": v["wall"], "cpu": v["cpu"]} for k, v in runs.items()},
            "workspaces": {str(w): {"wall": full[w]["wall"], "cpu": full[w]["cpu"], "probes": probes[w],
                                    "imports": imports[str(w)]} for w in workspaces}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
