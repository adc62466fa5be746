"""A stage process's start-up: which local services it finds (also from a DVC experiment's temporary workspace),
and that it does only the Prefect work its record needs. `bench/startup.py` measures the time itself."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest

from flows import server
from stages import store
from tests.conftest import REPO, TINY

# What a process started in `cwd` finds at import: the services' root, the Prefect API and the S3 endpoint.
DISCOVER = """
import json, os
import flows
from stages import store
fs = store.filesystem()
print(json.dumps({"root": str(flows.ROOT), "services": str(flows.SERVICES), "api": os.environ.get("PREFECT_API_URL"),
                  "home": os.environ["PREFECT_HOME"], "endpoint": fs.endpoint_url, "key": fs.key}))
"""
SERVICE_VARS = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "NEON_ROOT",
                store.SERVICES_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    return {**env, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture
def listener():
    """A port that takes connections, standing in for a running service."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def make_services(repo, prefect_port: int, s3_port: int) -> None:
    """`repo/.neon` as `neon prefect up` and `neon store up` leave it, the services "run" by this process."""
    (repo / ".neon" / "prefect").mkdir(parents=True)
    (repo / ".neon" / "prefect" / server.STATE).write_text(
        json.dumps({"pid": os.getpid(), "url": f"http://127.0.0.1:{prefect_port}/api"}))
    (repo / ".neon" / "store").mkdir(parents=True)
    (repo / ".neon" / "store" / "store.json").write_text(json.dumps(
        {"pid": os.getpid(), "endpoint": f"http://127.0.0.1:{s3_port}", "bucket": "neon",
         "data_dir": str(repo / ".neon" / "store" / "data"), "log": str(repo / ".neon" / "store" / "weed.log")}))


def workspace(path):
    path.mkdir(parents=True)
    (path / "dvc.yaml").write_text("stages: {}\n")
    return path


def discover(cwd, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", DISCOVER], cwd=cwd, env=clean_env(**env), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_services_root_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(store.SERVICES_ENV, raising=False)
    repo = tmp_path / "repo"
    assert store.services_root(repo) == repo.resolve()
    for exp in (".dvc/tmp/exps/standalone/tmpa1b2c3", ".dvc/tmp/exps/tmpxyz", ".dvc/tmp/exps/run/xyz/sub"):
        assert store.services_root(repo / exp) == repo.resolve(), exp
    nested = repo / ".dvc/tmp/exps/standalone/tmp1/.dvc/tmp/exps/standalone/tmp2"
    assert store.services_root(nested) == repo.resolve()  # the repository the user started from
    assert store.services_root(repo / ".dvc" / "tmp" / "other") == (repo / ".dvc" / "tmp" / "other").resolve()
    assert store.services_root(tmp_path / "exps" / ".dvc") == (tmp_path / "exps" / ".dvc").resolve()
    monkeypatch.chdir(repo.parent)
    assert store.services_root() == tmp_path.resolve()  # default: the current directory
    monkeypatch.setenv(store.SERVICES_ENV, str(tmp_path / "elsewhere"))
    assert store.services_root(repo / ".dvc/tmp/exps/standalone/tmp1") == (tmp_path / "elsewhere").resolve()


def test_experiment_workspace_finds_the_services_it_was_started_from(tmp_path, listener):
    """`dvc exp run --temp` runs each stage in <repo>/.dvc/tmp/exps/standalone/tmpXXXX, a copy without .neon/:
    the stage must use the repository's running Prefect server and store (with the store's local
    credentials), not start a temporary server or go to AWS without credentials."""
    with socket.socket() as s3:
        s3.bind(("127.0.0.1", 0))
        s3.listen()
        s3_port = s3.getsockname()[1]
        repo = workspace(tmp_path / "repo")
        make_services(repo, listener, s3_port)
        exp = workspace(repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpk2j4x9")
        found = discover(exp)
    assert found["root"] == str(exp.resolve())  # the stage still runs, and writes, in the experiment's copy
    assert found["services"] == str(repo.resolve())
    assert found["api"] == f"http://127.0.0.1:{listener}/api"
    assert found["home"] == str(repo.resolve() / ".neon" / "prefect")
    assert found["endpoint"] == f"http://127.0.0.1:{s3_port}"
    assert found["key"] == store.DEFAULT_CREDENTIALS["AWS_ACCESS_KEY_ID"]


def test_explicit_settings_win_and_a_plain_checkout_uses_its_own(tmp_path, listener):
    repo = workspace(tmp_path / "repo")
    make_services(repo, listener, listener)
    other = workspace(tmp_path / "other")
    mine = discover(other)  # a checkout of its own, without services: nothing found, nothing borrowed
    assert (mine["services"], mine["api"], mine["endpoint"]) == (str(other.resolve()), None, None)
    pointed = discover(other, NEON_SERVICES_ROOT=str(repo))
    assert pointed["services"] == str(repo.resolve()) and pointed["api"] == f"http://127.0.0.1:{listener}/api"
    exp = workspace(repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmp1")
    explicit = discover(exp, PREFECT_API_URL="http://127.0.0.1:9/api", AWS_ENDPOINT_URL_S3="http://127.0.0.1:9")
    assert (explicit["api"], explicit["endpoint"]) == ("http://127.0.0.1:9/api", "http://127.0.0.1:9")


def test_a_dead_server_is_not_found(tmp_path):
    home = tmp_path / "prefect"
    home.mkdir()
    with socket.socket() as s:  # a port nobody listens on, with a live pid: a pid reused after a reboot
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / server.STATE).write_text(json.dumps({"pid": os.getpid(), "url": f"http://127.0.0.1:{port}/api"}))
    assert server.running(home) is None
    (home / server.STATE).write_text("{not json")
    assert server.running(home) is None


def test_missing_s3_credentials_are_one_line():
    from botocore.exceptions import NoCredentialsError

    fs = SimpleNamespace(endpoint_url=None)
    with pytest.raises(store.StoreCredentialsError) as caught:
        with store.access(fs, "base.checkpoint s3://models/m.safetensors"):
            raise NoCredentialsError()
    message = str(caught.value)
    assert "\n" not in message and "AWS S3" in message and "base.checkpoint s3://models/m.safetensors" in message
    assert "neon store up" in message
    from models.errors import InputError

    assert isinstance(caught.value, InputError)  # the entry point prints it as one line, no traceback


def test_entry_point_imports_no_prefect_before_the_params_are_valid():
    proc = subprocess.run([sys.executable, "-c", "import sys, flows.stages\n"
                           "print(sorted(m for m in ('prefect', 'fastapi') if m in sys.modules))"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_heartbeats_are_prefects_event_and_stop_at_once(monkeypatch):
    import prefect.events

    from flows import stages as entry

    sent = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **event: sent.append(event))
    monkeypatch.setattr(entry, "FIRST_HEARTBEAT_S", 0.05)
    run = SimpleNamespace(id=uuid.uuid4(), name="fetch", flow_id=uuid.uuid4(), deployment_id=None, tags=["b", "a"])
    with entry.heartbeats(run, 30):
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 0.5  # Prefect's own thread is joined after up to 1 s of sleep
    assert len(sent) == 1
    event = sent[0]
    assert event["event"] == "prefect.flow-run.heartbeat"
    assert event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run.id}"
    assert event["resource"]["prefect.resource.name"] == "fetch"
    assert [r["prefect.resource.id"] for r in event["related"]] == [f"prefect.flow.{run.flow_id}", "prefect.tag.a",
                                                                   "prefect.tag.b"]
    with entry.heartbeats(run, None):  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY unset to None: none at all
        pass
    assert len(sent) == 1


# The real entry point with a stage that only looks at its surroundings, then the flow run as the server has it.
STAGE_SCRIPT = """
import json, sys, threading
import flows.stages as entry
seen = {}

def look(module, params):
    from prefect.context import FlowRunContext
    from prefect.settings import get_current_settings
    seen["id"] = str(FlowRunContext.get().flow_run.id)
    seen["prefect_heartbeat"] = get_current_settings().flows.heartbeat_frequency
    seen["threads"] = sorted(t.name for t in threading.enumerate())
    return {"artifact": "merged", "digest": "d" * 64}

entry.RUNNERS["merge"] = ("stages.merge", look)
code = entry.main(["merge"])
seen["fastapi"] = "fastapi" in sys.modules
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    run = client.read_flow_run(seen["id"])
    seen["run"] = {"name": run.name, "state": run.state.type.value, "flow": client.read_flow(run.flow_id).name,
                   "stage": run.parameters.get("stage"), "weights": run.parameters["params"]["merge"]["weights"]}
print(json.dumps({"code": code, **seen}))
"""


def test_stage_flow_run_is_recorded_without_the_overhead(tmp_path, prefect_api):
    (tmp_path / "params.yaml").write_text(TINY.read_text())
    proc = subprocess.run([sys.executable, "-c", STAGE_SCRIPT], cwd=tmp_path,
                          env=clean_env(PREFECT_API_URL=prefect_api), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 0
    assert out["run"] == {"name": "merge", "state": "COMPLETED", "flow": "neon-stage", "stage": "merge",
                          "weights": [0.5, 1.0]}
    assert out["prefect_heartbeat"] is None  # Prefect's heartbeat thread is off ...
    assert "neon-flow-run-heartbeat" in out["threads"]  # ... and ours beats instead
    assert out["fastapi"] is False  # the parameters were serialised without Prefect's FastAPI encoder
    assert "note: no local Prefect server" not in proc.stderr


def test_flow_loaded_by_path_still_imports_the_stages_package():
    """A worker loads the deployment's entry point by its path (prefect.yaml: flows/pipeline.py), which puts
    flows/ first on sys.path, where flows/stages.py would shadow the `stages` package that flows/__init__.py
    imports for the services' root."""
    script = ("from prefect.utilities.importtools import load_script_as_module\n"
              "module = load_script_as_module('flows/pipeline.py')\n"
              "import stages.store\n"
              "print(module.pipeline.name, stages.store.__name__)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                          env=clean_env(PREFECT_API_URL="http://127.0.0.1:9/api"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["neon-pipeline", "stages.store"]
