"""One Prefect flow per stage; `python -m flows STAGE` is the command each `dvc.yaml` stage runs.

Params are validated before Prefect starts, so a bad `params.yaml` fails in a second with one line.
Problems with the inputs (`models.errors.InputError`: a corrupted checkpoint, a missing object) end
the flow run as Failed with that one line as its message; anything else is a bug: the flow run fails
and the command exits with the exception's full traceback.
"""
from __future__ import annotations

import importlib
import json
import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Failed

from models.errors import InputError
from stages import distributed
from stages.common import EVALUATE
from stages.params import Params, ParamsError, load

INPUT_ERROR = "InputError"  # the name of a flow run's Failed state when the user's input, not the code, is at fault


def task_step(name: str, fn, *args):
    """Run a stage's sub-step as a Prefect task (visible, retried); its result cache is the stage's own.
    Outside a flow run (torchrun's processes other than 0) it is a plain call."""
    if FlowRunContext.get() is None:
        return fn(*args)
    return task(fn, name=name, retries=1, cache_policy=NO_CACHE, persist_result=False)(*args)


# stage -> (its module, how it is called). A stage imports only its own module when it runs: the
# metrics stack (clean-fid, torchvision) costs seconds of start-up that data, train or merge never use.
RUNNERS = {
    "data": ("stages.data", lambda m, p: m.run(p.data)),
    "reference": ("stages.reference", lambda m, p: m.run(p.reference)),
    "train": ("stages.train", lambda m, p: m.run(p.model, p.train, p.base)),
    "fetch": ("stages.fetch", lambda m, p: m.run(p.base, p.model)),
    "sample": ("stages.sample", lambda m, p: m.run(p.sample, p.model, step=task_step)),
    "finetune": ("stages.finetune", lambda m, p: m.run(p.finetune, p.model)),
    "evaluate": ("stages.evaluate", lambda m, p: publish_report(m.run(p.evaluate, p.sample, p.model, p.merge,
                                                                       step=task_step))),
    "merge": ("stages.merge", lambda m, p: m.run(p.merge)),
}
# The stages that share their work among processes started by torchrun (`stages.distributed`).
DISTRIBUTED = ("sample", "train", "finetune")


def publish_report(manifest: dict) -> dict:
    """The report and the FID curve as keyed Prefect artifacts, so each run's version shows in the UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(markdown=(EVALUATE / "report.md").read_text(), key="neon-report",
                             description=f"Neon evaluation, artifact digest {manifest['digest'][:16]}")
    result = json.loads((EVALUATE / "evaluation.json").read_text())
    create_table_artifact(table=result["sweep"], key="neon-fid-vs-w", description="classifier FID per w")
    return manifest


@flow(name="neon-stage", flow_run_name="{stage}", log_prints=True, persist_result=False)
def stage_flow(stage: str, params: Params):
    try:
        module, call = RUNNERS[stage]
        manifest = call(importlib.import_module(module), params)
    except InputError as exc:
        return Failed(message=str(exc), name=INPUT_ERROR)
    return {"artifact": manifest["artifact"], "digest": manifest["digest"]}


def run_stage_flow(stage: str, params: Params):
    """The stage's flow run, as a child of the pipeline's flow run when NEON_PARENT_FLOW_RUN_ID names one
    (flows/pipeline.py sets it for `dvc repro`): like Prefect's own nested flows, a tracking task run in the
    parent and the stage's flow run created with it as `parent_task_run_id` (the server mirrors the child's
    state onto it). Without the variable, or when the parent cannot be reached, it is a flow run of its own."""
    import os

    parent = os.environ.get("NEON_PARENT_FLOW_RUN_ID", "").strip()
    if not parent:
        return stage_flow(stage, params, return_state=True)
    from uuid import UUID, uuid4

    from prefect import Task
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    arguments = {"stage": stage, "params": params}
    try:
        with get_client(sync_client=True) as client:
            tracker = client.create_task_run(task=Task(name=stage_flow.name, fn=stage_flow.fn), flow_run_id=UUID(parent),
                                             dynamic_key=f"{stage}-{uuid4().hex[:8]}", name=stage, state=Pending())
            child = client.create_flow_run(flow=stage_flow, parameters=stage_flow.serialize_parameters(arguments),
                                           parent_task_run_id=tracker.id, state=Pending())
    except Exception as exc:  # noqa: BLE001 - the stage still runs; only the link in the UI is lost
        print(f"warning: stage {stage} not linked to flow run {parent}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return stage_flow(stage, params, return_state=True)
    return run_flow(stage_flow, flow_run=child, parameters=arguments, return_type="state")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in RUNNERS:
        print(f"usage: python -m flows STAGE   (STAGE: {' | '.join(RUNNERS)})", file=sys.stderr)
        return 2
    try:
        params = load()
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if distributed.size() > 1:
        if argv[0] not in DISTRIBUTED:
            print(f"error: stage {argv[0]} runs in one process (torchrun started {distributed.size()}); run it with "
                  f"`python -m flows {argv[0]}` (torchrun serves {', '.join(DISTRIBUTED)})", file=sys.stderr)
            return 1
        if distributed.rank() > 0:
            return _helper_process(argv[0], params)
    state = run_stage_flow(argv[0], params)
    if state.is_failed() and state.name == INPUT_ERROR:
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    state.result()  # a bug: re-raises the flow's exception, so its traceback reaches the user
    return 0


def _helper_process(stage: str, params: Params) -> int:
    """One of torchrun's processes other than 0: the stage without a flow run of its own. Process 0's flow run
    is the stage's one record in Prefect (and N processes starting Prefect at once would race for its database);
    its sub-steps (`task_step`) run as plain calls here."""
    module, call = RUNNERS[stage]
    try:
        call(importlib.import_module(module), params)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
