"""A tiny project whose stages ran once (data -> train -> fetch -> sample -> finetune), copied per test,
so each fault is injected into real artifacts without rerunning the DAG."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages import params

TINY = Path(__file__).resolve().parent.parent / "tiny_params.yaml"
REPO = TINY.parent.parent


def tiny_params(**changes) -> params.Params:
    return params.parse(params.with_overrides(yaml.safe_load(TINY.read_text()), changes))


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The folder where the tiny preset's stages ran, through finetune (in-process, about 10 s)."""
    from stages import data, fetch, finetune, sample, train

    root = tmp_path_factory.mktemp("built")
    p = tiny_params()
    old = Path.cwd()
    os.chdir(root)
    try:
        data.run(p.data)
        train.run(p.model, p.train, p.base)
        fetch.run(p.base, p.model)
        sample.run(p.sample, p.model)
        finetune.run(p.finetune, p.model)
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def workspace(built, tmp_path, monkeypatch):
    """A private copy of the built project, as the current folder."""
    root = tmp_path / "project"
    shutil.copytree(built, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def stage_process(stage_call: str, cwd: Path, **param_changes) -> subprocess.Popen:
    """A fresh Python process running one stage function in `cwd` with the tiny preset (no Prefect):
    `stage_call` is e.g. "sample.run(p.sample, p.model)"."""
    module = stage_call.split(".")[0]
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from tests.faults.conftest import tiny_params\n"
            f"from stages import {module}\n"
            f"p = tiny_params(**{param_changes!r})\n"
            f"{stage_call}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `proc` as soon as `ready()` is true; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the stage neither finished nor reached the kill point in time")
