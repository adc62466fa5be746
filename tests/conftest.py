"""Real services for the tests: a SeaweedFS S3 server and a Prefect API server, both on 127.0.0.1,
started once per session in temporary folders and stopped by PID."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import yaml

from flows import server
from stages import params, store

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = REPO / "tests" / "tiny_params.yaml"


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    state = tmp_path_factory.mktemp("store")
    info = store.start(state)
    yield info
    store.stop(state)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    url = server.start(home)
    yield url
    server.stop(home)


@pytest.fixture(scope="session")
def project(tmp_path_factory, s3_store, prefect_api):
    """A copy of the repository (a git repo of its own) with the tiny preset, wired to the test store."""
    root = tmp_path_factory.mktemp("project")
    # tracked files and new ones not yet committed (not the ignored): the working tree under test
    tracked = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO, dict(os.environ)).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    shutil.copyfile(TINY, root / "params.yaml")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_API_URL": prefect_api,
           "PREFECT_HOME": str(root / ".neon" / "prefect"), **store.s3_env(s3_store.endpoint)}
    env.pop("PYTHONPATH", None)
    git = ["git", "-c", "user.email=t@localhost", "-c", "user.name=t"]
    run(git + ["init", "-q"], root, env)
    run(git + ["add", "-A"], root, env)
    run(git + ["commit", "-qm", "test project"], root, env)
    (root / ".dvc" / "config.local").write_text("".join(
        f"['remote \"{remote}\"']\n"
        f"    endpointurl = {s3_store.endpoint}\n"
        f"    access_key_id = {store.credentials()['AWS_ACCESS_KEY_ID']}\n"
        f"    secret_access_key = {store.credentials()['AWS_SECRET_ACCESS_KEY']}\n" for remote in ("store", "exps")))
    return root, env


def run_stages(p: params.Params, last: str = "merge") -> None:
    """The stage functions `dvc repro` runs, in order, in the current folder, through `last`."""
    from stages import data, evaluate, fetch, finetune, merge, reference, sample, train

    for name, step in [("data", lambda: data.run(p.data)), ("reference", lambda: reference.run(p.reference)),
                       ("train", lambda: train.run(p.model, p.train, p.base)), ("fetch", lambda: fetch.run(p.base, p.model)),
                       ("sample", lambda: sample.run(p.sample, p.model)),
                       ("finetune", lambda: finetune.run(p.finetune, p.model)),
                       ("evaluate", lambda: evaluate.run(p.evaluate, p.sample, p.model, p.merge)),
                       ("merge", lambda: merge.run(p.merge))]:
        step()
        if name == last:
            return


def set_params(root: Path, **changes) -> str:
    """Apply dotted-key changes to params.yaml; return the old text so the test can restore it."""
    path = root / "params.yaml"
    old = path.read_text()
    path.write_text(yaml.safe_dump(params.with_overrides(yaml.safe_load(old), changes)))
    return old


@contextmanager
def restored(root: Path, env: dict[str, str]):
    """Put the project back as the first `dvc repro` left it: params, lock and metrics from before, outputs
    from the DVC cache (seconds, where rerunning the changed stages would take a minute)."""
    kept = {p: p.read_bytes() for p in [root / "params.yaml", root / "dvc.lock", *(root / "results").glob("*")]}
    try:
        yield
    finally:
        for path, data in kept.items():
            path.write_bytes(data)
        run(["dvc", "checkout", "--force", "--quiet"], root, env)


class Reproduced(tuple):
    """(root, env, stdout of the first `dvc repro`), plus `scheduled`: what the deployment run reported (its
    id, state, child stage runs and result), `origin`: the project's bare git remote, `worker_log`."""


@pytest.fixture(scope="session")
def reproduced(project, tmp_path_factory):
    """The tiny pipeline's first run, made the way the schedule makes it: `neon schedule apply` registers
    prefect.yaml's deployment on the session's Prefect server, `neon schedule worker` polls its pool, and
    `neon schedule run --wait` triggers it. The run pulls (git from the project's bare remote, DVC from the
    store), runs `dvc repro`, pushes, and commits dvc.lock + results/ to the remote's branch neon/results."""
    root, env = project
    origin = tmp_path_factory.mktemp("origin") / "neon.git"
    run(["git", "clone", "--quiet", "--bare", str(root), str(origin)], root, env)
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root, env).stdout.strip()
    run(["git", "remote", "add", "origin", str(origin)], root, env)
    run(["git", "fetch", "--quiet", "origin"], root, env)
    run(["git", "branch", "--quiet", f"--set-upstream-to=origin/{branch}"], root, env)
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "ab") as out:  # polls every second; commits the run's record to origin's neon/results
        worker = subprocess.Popen(["neon", "schedule", "worker", "--name", "test-worker"], cwd=root, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "NEON_COMMIT_BRANCH": "neon/results"})
    try:
        run(["neon", "schedule", "apply"], root, env)
        scheduled = trigger(root, env, log)
        result = Reproduced((root, env, scheduled["result"]["repro_output"]))
        result.scheduled, result.origin, result.worker_log = scheduled, origin, log
        yield result
    finally:  # the worker we started, by its process group
        with suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def trigger(root: Path, env: dict[str, str], worker_log: Path) -> dict:
    """Run the deployment now through the worker and wait for it; the run's report (`neon schedule run`)."""
    proc = run(["neon", "schedule", "run", "--wait", "--json", "--timeout", "900"], root, env, check=False)
    report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    if report.get("state") != "COMPLETED" or "result" not in report:
        raise AssertionError(f"the deployment run ended {report.get('state')}: {report.get('message')} "
                             f"{report.get('result_error', '')}\n"
                             f"{proc.stderr[-3000:]}\nworker:\n{worker_log.read_text()[-6000:]}")
    return report
