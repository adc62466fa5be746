"""Real services for the tests: a SeaweedFS S3 server and a Prefect API server, both on 127.0.0.1,
started once per session in temporary folders and stopped by PID."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
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
    tracked = run(["git", "ls-files"], REPO, dict(os.environ)).stdout.split()
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
    (root / ".dvc" / "config.local").write_text(
        "['remote \"store\"']\n"
        f"    endpointurl = {s3_store.endpoint}\n"
        f"    access_key_id = {store.credentials()['AWS_ACCESS_KEY_ID']}\n"
        f"    secret_access_key = {store.credentials()['AWS_SECRET_ACCESS_KEY']}\n")
    return root, env


def run_stages(p: params.Params, last: str = "evaluate") -> None:
    """The stage functions `dvc repro` runs, in order, in the current folder, through `last`."""
    from stages import data, evaluate, fetch, finetune, merge, reference, sample, train

    for name, step in [("data", lambda: data.run(p.data)), ("reference", lambda: reference.run(p.reference)),
                       ("train", lambda: train.run(p.model, p.train, p.base)), ("fetch", lambda: fetch.run(p.base, p.model)),
                       ("sample", lambda: sample.run(p.sample, p.model)),
                       ("finetune", lambda: finetune.run(p.finetune, p.model)), ("merge", lambda: merge.run(p.merge)),
                       ("evaluate", lambda: evaluate.run(p.evaluate, p.sample, p.model))]:
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


@pytest.fixture(scope="session")
def reproduced(project):
    root, env = project
    first = run(["dvc", "repro"], root, env)
    run(["dvc", "push"], root, env)
    return root, env, first.stdout
