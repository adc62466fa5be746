"""A real scheduled run: prefect.yaml's deployment on the session's Prefect server, a process worker polling
its pool (`neon schedule worker`), a triggered run of the whole pipeline against the real SeaweedFS.

The first run is the session fixture `reproduced` (tests/conftest.py), so every end-to-end test works on
what the scheduled run left; these tests check the run itself, then trigger it once more."""
from __future__ import annotations

import json

import pytest
import yaml

from stages import store
from tests.conftest import run, trigger

pytestmark = pytest.mark.e2e

STAGES = ["data", "reference", "train", "fetch", "sample", "finetune", "evaluate", "merge"]

# What the Prefect client reads back about a run: its deployment, and its child flow runs with the tracking
# task runs the parent holds for them.
READ_RUN = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

async def main(run_id):
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        dep = await client.read_deployment(run.deployment_id)
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        out = {"deployment": {"name": dep.name, "pool": dep.work_pool_name, "limit": dep.global_concurrency_limit.limit,
                              "collision": str(dep.concurrency_options.collision_strategy.value),
                              "crons": [s.schedule.cron for s in dep.schedules], "pull": dep.pull_steps},
               "state": run.state.type.value, "children": []}
        for child in children:
            tracker = await client.read_task_run(child.parent_task_run_id)
            out["children"].append({"name": child.name, "flow": (await client.read_flow(child.flow_id)).name,
                                    "state": child.state.type.value, "tracker_in": str(tracker.flow_run_id),
                                    "tracker_state": tracker.state.type.value,
                                    "tracker_child": str(tracker.state.state_details.child_flow_run_id)})
        print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


def read_run(root, env, run_id: str) -> dict:
    return json.loads(run(["python", "-c", READ_RUN, run_id], root, env).stdout.strip().splitlines()[-1])


def test_scheduled_run_completes_with_its_stages_as_children(reproduced):
    root, env, _ = reproduced
    report = reproduced.scheduled
    assert report["state"] == "COMPLETED"
    seen = read_run(root, env, report["flow_run_id"])
    assert seen["state"] == "COMPLETED"
    deployment = seen["deployment"]
    assert len(deployment.pop("crons")) == 1  # its value: whatever `neon schedule apply --cron` set last
    assert deployment == {"name": "nightly", "pool": "neon", "limit": 1, "collision": "ENQUEUE",
                          "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $NEON_ROOT }}"}}]}
    children = seen["children"]
    assert sorted(c["name"] for c in children) == sorted(STAGES)  # each stage's flow run, linked to this run
    for child in children:
        assert (child["flow"], child["state"], child["tracker_state"]) == ("neon-stage", "COMPLETED", "COMPLETED")
        assert child["tracker_in"] == report["flow_run_id"]
    assert sorted(c["name"] for c in report["children"]) == sorted(STAGES)  # `neon schedule run` sees them too
    assert report["result"]["ran"] == STAGES


def test_scheduled_run_pushed_its_results(reproduced, s3_store):
    """The outputs are in the bucket at the versions dvc.lock records; the flow's result is in the store
    too (read back by `neon schedule run`); dvc.lock and results/ are committed on origin's neon/results."""
    root, env, _ = reproduced
    fs = store.filesystem(s3_store.endpoint)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    pushed = {}  # every cached output file -> the version id `dvc push` recorded for it
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            for entry in out.get("files", [out]):  # a folder lists its files, each with its own version
                path = f"{out['path']}/{entry['relpath']}" if "relpath" in entry else out["path"]
                if "cloud" in entry:
                    pushed[path] = entry["cloud"]["store"]["version_id"]
    assert {path.split("/")[1] for path in pushed} == {"data", "reference", "train", "base", "synthetic",
                                                       "selftrained", "merged", "evaluate", "curves"}
    for path, version in pushed.items():  # that exact version is in the bucket
        assert fs.info(f"{s3_store.bucket}/dvc/{path}", version_id=version)["size"] >= 0
    assert fs.find(f"{s3_store.bucket}/prefect-results"), "the flow's result is not in the store"
    assert reproduced.scheduled["result"]["metrics"] == json.loads((root / "results" / "metrics.json").read_text())
    origin = reproduced.origin
    commit = reproduced.scheduled["result"]["commit"]
    assert run(["git", "rev-parse", "neon/results"], origin, env).stdout.strip() == commit
    assert run(["git", "show", f"{commit}:dvc.lock"], origin, env).stdout == (root / "dvc.lock").read_text()
    assert json.loads(run(["git", "show", f"{commit}:results/metrics.json"], origin, env).stdout) == \
        reproduced.scheduled["result"]["metrics"]


def test_second_trigger_is_all_cache_hits(reproduced):
    root, env, _ = reproduced
    lock = (root / "dvc.lock").read_text()
    again = trigger(root, env, reproduced.worker_log)
    assert again["result"]["ran"] == [], again["result"]["repro_output"]
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in again["result"]["repro_output"]
    assert again["children"] == []  # no stage ran, so no stage flow run
    assert (root / "dvc.lock").read_text() == lock


def test_pull_sets_aside_an_old_record_that_the_remote_replaces(tmp_path, monkeypatch):
    """The worker's checkout still holds the previous run's dvc.lock (uncommitted) while the team committed
    another: the pull sets the old one aside and fast-forwards; a conflicting code change stops the run."""
    import os

    from flows import pipeline

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}
    seed, worker, team = tmp_path / "seed", tmp_path / "worker", tmp_path / "team"
    seed.mkdir()
    (seed / "dvc.lock").write_text("v1\n")
    (seed / "code.py").write_text("a = 1\n")
    run(["git", "init", "--quiet", "--initial-branch=main"], seed, env)
    run(["git", "add", "-A"], seed, env)
    run(["git", "commit", "--quiet", "-m", "v1"], seed, env)
    run(["git", "clone", "--quiet", "--bare", str(seed), str(tmp_path / "origin.git")], tmp_path, env)
    for clone in (worker, team):
        run(["git", "clone", "--quiet", str(tmp_path / "origin.git"), str(clone)], tmp_path, env)
    (worker / "dvc.lock").write_text("previous run\n")  # left for the team to commit, never committed
    (team / "dvc.lock").write_text("v2\n")
    run(["git", "commit", "--quiet", "-am", "v2"], team, env)
    run(["git", "push", "--quiet"], team, env)
    monkeypatch.setattr(pipeline, "ROOT", worker)
    monkeypatch.setattr(pipeline, "ASIDE", worker / ".neon" / "pipeline")
    head = pipeline.update_checkout.fn()
    assert head == run(["git", "rev-parse", "HEAD"], team, env).stdout.strip()
    assert (worker / "dvc.lock").read_text() == "v2\n"
    assert (worker / ".neon" / "pipeline" / "set-aside" / "dvc.lock").read_text() == "previous run\n"

    (team / "code.py").write_text("a = 2\n")
    run(["git", "commit", "--quiet", "-am", "code"], team, env)
    run(["git", "push", "--quiet"], team, env)
    (worker / "code.py").write_text("a = 3\n")  # a local edit the pull would overwrite: git's refusal stops it
    with pytest.raises(RuntimeError, match="(?s)git merge --ff-only failed.*code.py"):
        pipeline.update_checkout.fn()
    assert (worker / "code.py").read_text() == "a = 3\n"
    with pytest.raises(RuntimeError, match="is the branch this checkout follows"):
        pipeline.commit_record.fn("main", "results")
