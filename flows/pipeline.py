"""The whole pipeline as one Prefect flow, for scheduled deployments.

It runs `dvc repro` (which reruns only the stages whose code, params or inputs changed) and then
`dvc push` to the object store, so a scheduled run and a person's run share one DAG and one cache.
"""
from __future__ import annotations

import json
import subprocess

from prefect import flow, task

from flows import ROOT

DEPLOYMENT = "nightly"
CRON = "0 3 * * *"  # 03:00 every day, in the deployment's timezone


@task(retries=1, retry_delay_seconds=30)
def dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-4000:])
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


@flow(name="neon-pipeline", log_prints=True)
def pipeline(push: bool = True) -> dict:
    dvc("repro")
    if push:
        dvc("push")
    return json.loads((ROOT / "results" / "metrics.json").read_text())


def deployment(cron: str = CRON, name: str = DEPLOYMENT):
    """The scheduled deployment (served by `neon schedule serve`, or applied to a server)."""
    return pipeline.to_deployment(name=name, cron=cron, description="Neon pipeline: dvc repro + dvc push")
