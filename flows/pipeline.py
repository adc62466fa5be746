"""The whole pipeline as one Prefect flow, for scheduled deployments (`prefect.yaml`, `neon schedule`).

One run: bring the checkout up to date (`git pull --ff-only` when its branch tracks a remote), fetch
what the committed `dvc.lock` already has in the store (`dvc pull`, missing objects tolerated), `dvc repro`
(reruns only the stages whose code, params or inputs changed), `dvc push`, then publish the new
`dvc.lock`: it stays in the checkout, is attached to the run as the Prefect artifact `neon-dvc-lock`,
and, when NEON_COMMIT_BRANCH names a branch, is committed with `results/` on that branch and pushed.
Each stage's flow run (`python -m flows STAGE` under `dvc repro`) is a child of this run: the run's id
travels to them in NEON_PARENT_FLOW_RUN_ID (flows/stages.py links them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE

from flows import ROOT

DEPLOYMENT = "nightly"
CRON = "0 3 * * *"  # 03:00 every day, in the deployment's timezone
WORK_POOL = "neon"  # a process work pool: `neon schedule worker` (or docker/compose.yaml's worker) polls it
RESULTS_BLOCK = "neon-results"  # remote-file-system/neon-results: Prefect's results, in the S3 store
PARENT_ENV = "NEON_PARENT_FLOW_RUN_ID"
COMMIT_BRANCH_ENV = "NEON_COMMIT_BRANCH"
RECORD = ("dvc.lock", "results")  # what a run changes in git: the lock (with the pushed version ids) and metrics
ASIDE = ROOT / ".neon" / "pipeline"  # earlier records set aside by the pull; a scratch git index


def _run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          check=False)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _git(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    return _run(["git", *args], env, check).stdout.strip()


def _upstream() -> str | None:
    """The remote branch the checkout follows (e.g. origin/main), if it follows one."""
    if not (ROOT / ".git").exists():
        return None
    return _git("rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}", check=False) or None


@task(name="git-pull", cache_policy=NO_CACHE)
def update_checkout() -> str:
    """`git pull --ff-only` on a checkout whose branch tracks a remote; anything else runs as it is.

    A previous run's dvc.lock or results/ that the incoming commits also change are set aside under
    .neon/pipeline/ first (their data is in the store already), so the pull is not refused for them. Any
    other local change that conflicts stops the run with git's message."""
    upstream = _upstream()
    if upstream is None:
        print("git: the checkout follows no remote branch; running it as it is")
        return _git("rev-parse", "HEAD", check=False) or "not a git checkout"
    _git("fetch", "--quiet")
    incoming = set(_git("diff", "--name-only", "HEAD", "@{upstream}", "--", *RECORD).splitlines())
    local = set(_git("diff", "--name-only", "HEAD", "--", *RECORD).splitlines()) | \
        set(_git("ls-files", "--others", "--exclude-standard", "--", *RECORD).splitlines())
    tracked = set(_git("ls-files", "--", *RECORD).splitlines())
    for path in sorted(incoming & local):
        (ASIDE / "set-aside" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, ASIDE / "set-aside" / path)
        if path in tracked:
            _git("checkout", "HEAD", "--", path)
        else:
            (ROOT / path).unlink()
        print(f"git: set aside the previous {path} (.neon/pipeline/set-aside/{path}) for the incoming one")
    before = _git("rev-parse", "HEAD")
    _git("merge", "--ff-only", "--quiet", "@{upstream}")
    after = _git("rev-parse", "HEAD")
    print(f"git: {upstream} {'up to date' if before == after else f'{before[:12]} -> {after[:12]}'}")
    return after


@task(name="dvc", retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE)
def dvc(*args: str, env: dict[str, str] | None = None) -> str:
    """A dvc command in the checkout. DVC's repository lock turns away a second dvc command while one
    runs (e.g. a manual `dvc repro` during a scheduled one): that failure is retried once after 30 s."""
    proc = _run(["dvc", *args], env, check=False)
    print(proc.stdout[-4000:])
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def stages_ran(repro_output: str) -> list[str]:
    return [line.split("'")[1] for line in repro_output.splitlines() if line.startswith("Running stage")]


@task(name="publish-dvc-lock", cache_policy=NO_CACHE)
def publish_lock() -> str:
    """The new dvc.lock as the run's artifact `neon-dvc-lock` (the UI shows it; anyone can commit it)."""
    from prefect.artifacts import create_markdown_artifact

    lock = (ROOT / "dvc.lock").read_text() if (ROOT / "dvc.lock").exists() else ""
    create_markdown_artifact(key="neon-dvc-lock", markdown=f"```yaml\n{lock}```\n",
                             description="dvc.lock after `dvc repro` + `dvc push` (with the pushed version ids)")
    return lock


@task(name="git-commit-results", cache_policy=NO_CACHE)
def commit_record(branch: str, message: str) -> str:
    """Commit dvc.lock and results/ on top of HEAD as `branch` and push it there (force: the branch is the
    pipeline's, rewritten by each run, to be merged by the team). The checkout itself is not touched."""
    current = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch == current:
        raise RuntimeError(f"{COMMIT_BRANCH_ENV}={branch} is the branch this checkout follows; name another "
                           "branch for the pipeline's commits (e.g. neon/results) and merge it from there")
    upstream = _upstream()
    remote = upstream.split("/", 1)[0] if upstream else (_git("remote", check=False).splitlines() or [None])[0]
    if not remote:
        raise RuntimeError(f"{COMMIT_BRANCH_ENV} is set but the checkout has no git remote to push to")
    ASIDE.mkdir(parents=True, exist_ok=True)
    index = {"GIT_INDEX_FILE": str(ASIDE / "index")}  # a scratch index: the checkout's own stays as it is
    _git("read-tree", "HEAD", env=index)
    _git("add", "--force", "--", *[p for p in RECORD if (ROOT / p).exists()], env=index)
    tree = _git("write-tree", env=index)
    identity = {} if _git("config", "user.email", check=False) else {
        "GIT_AUTHOR_NAME": "neon pipeline", "GIT_AUTHOR_EMAIL": "neon-pipeline@localhost",
        "GIT_COMMITTER_NAME": "neon pipeline", "GIT_COMMITTER_EMAIL": "neon-pipeline@localhost"}
    commit = _git("commit-tree", tree, "-p", "HEAD", "-m", message, env=identity)
    _git("push", "--quiet", "--force", remote, f"{commit}:refs/heads/{branch}")
    print(f"git: committed {', '.join(RECORD)} as {commit[:12]} and pushed it to {remote}/{branch}")
    return commit


@flow(name="neon-pipeline", log_prints=True)
def pipeline(push: bool = True, pull: bool = True) -> dict:
    run_id = str(runtime.flow_run.id or "")
    checkout = update_checkout() if pull else None
    if pull:  # outputs the committed dvc.lock records; a stage whose objects are missing simply reruns
        dvc("pull", "--allow-missing")
    repro = dvc("repro", env={PARENT_ENV: run_id} if run_id else None)
    if push:
        dvc("push")
    lock = publish_lock()
    commit = None
    if branch := os.environ.get(COMMIT_BRANCH_ENV, "").strip():
        commit = commit_record(branch, f"neon: dvc.lock and results/ of flow run {runtime.flow_run.name} ({run_id})")
    metrics = ROOT / "results" / "metrics.json"
    return {"metrics": json.loads(metrics.read_text()) if metrics.exists() else None, "ran": stages_ran(repro),
            "repro_output": repro, "checkout": checkout, "commit": commit, "dvc_lock_bytes": len(lock)}


def deployment(cron: str = CRON, name: str = DEPLOYMENT):
    """The scheduled deployment served from one process (`neon schedule serve`); `prefect.yaml` has the
    same deployment for a work pool (`neon schedule apply`)."""
    return pipeline.to_deployment(name=name, cron=cron, concurrency_limit=1,
                                  description="Neon pipeline: git pull, dvc pull, dvc repro, dvc push")
