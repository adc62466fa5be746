"""One Prefect flow per stage; `python -m flows STAGE` is the command each `dvc.yaml` stage runs.

Params are validated before Prefect is imported, so a bad `params.yaml` fails with one line before any
Prefect work. Problems with the inputs (`models.errors.InputError`: a corrupted checkpoint, a missing
object) end the flow run as Failed with that one line as its message; anything else is a bug: the flow
run fails and the command exits with the exception's full traceback.

Start-up is most of what a stage with little to do costs (`bench/startup.py` measures it), so a stage
process does only the Prefect work its record needs: it imports Prefect once the params are valid (and
not at all in torchrun's helper processes), creates its flow run itself, with the parameters serialised
by pydantic (Prefect's own serialiser imports FastAPI, ~0.3 s), in the one client session the engine then
uses, and replaces Prefect's flow-run heartbeat thread, which sleeps in whole seconds and is joined when
the run ends (up to 1 s per stage), with one that emits the same heartbeat event and stops at once.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import sys
import threading

from models.errors import InputError
from stages.params import Params, ParamsError, load

INPUT_ERROR = "InputError"  # the name of a flow run's Failed state when the user's input, not the code, is at fault
FLOW_NAME = "neon-stage"
PARENT_ENV = "NEON_PARENT_FLOW_RUN_ID"  # flows/pipeline.py sets it for `dvc repro`


def task_step(name: str, fn, *args):
    """Run a stage's sub-step as a Prefect task (visible, retried); its result cache is the stage's own.
    Outside a flow run (torchrun's processes other than 0) it is a plain call."""
    if "prefect" not in sys.modules:  # a helper process never imports Prefect
        return fn(*args)
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext

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
    "merge": ("stages.merge", lambda m, p: m.run(p.merge)),
    "evaluate": ("stages.evaluate",
                 lambda m, p: publish_report(m.run(p.evaluate, p.sample, p.model, p.merge, step=task_step))),
}
# The stages that share their work among processes started by torchrun (`stages.distributed`).
DISTRIBUTED = ("sample", "train", "finetune")


def publish_report(manifest: dict) -> dict:
    """The report and the FID curve as keyed Prefect artifacts, so each run's version shows in the UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from stages.common import EVALUATE

    create_markdown_artifact(markdown=(EVALUATE / "report.md").read_text(), key="neon-report",
                             description=f"Neon evaluation, artifact digest {manifest['digest'][:16]}")
    result = json.loads((EVALUATE / "evaluation.json").read_text())
    create_table_artifact(table=result["sweep"], key="neon-fid-vs-w", description="classifier FID per w")
    return manifest


def imports_done() -> None:
    """The end of start-up. `python -m flows` (flows/__main__.py) turns the garbage collector off while it
    imports: torch, Prefect and pydantic allocate about a million objects that live as long as the process,
    and collecting while they pile up costs ~0.5 s of CPU. Here they move to the collector's permanent
    generation (`gc.freeze`), which also spares the collections at exit, and collection resumes for the
    stage's own work. A caller that left the collector on (tests calling `main`) is left as it is."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def import_stage(stage: str):
    module = importlib.import_module(RUNNERS[stage][0])
    imports_done()
    return module


# Prefect's heartbeat interval (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, None: no heartbeats), read before
# Prefect's own heartbeat thread is switched off for the stage's flow run (`run_stage_flow`).
_heartbeat_s: list[int | None] = [None]
FIRST_HEARTBEAT_S = 10.0  # a stage done sooner never opens the events connection that heartbeats go through


@contextlib.contextmanager
def heartbeats(flow_run, every: int | None):
    """Prefect's flow-run heartbeat (the `prefect.flow-run.heartbeat` event that a zombie-detection automation
    watches, with the resource and related resources Prefect gives it) every `every` seconds while the stage
    runs, from a thread that ends as soon as the stage does. The first beat comes after
    `min(every, FIRST_HEARTBEAT_S)` seconds."""
    if not every or flow_run is None:
        yield
        return
    import contextvars

    from prefect import __version__
    from prefect.events import emit_event

    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.name": flow_run.name or "", "prefect.version": __version__}
    related = [{"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow",
                "prefect.resource.name": FLOW_NAME}]
    if flow_run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    related += [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"}
                for t in sorted(set(flow_run.tags or []))]
    stop = threading.Event()

    def beat() -> None:
        wait = min(every, FIRST_HEARTBEAT_S)
        while not stop.wait(wait):
            try:
                emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
            except Exception:  # noqa: BLE001 - a missed heartbeat must not fail the stage
                pass
            wait = every

    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True,
                              name="neon-flow-run-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


def stage_flow_fn(stage: str, params: Params):
    from prefect.context import FlowRunContext
    from prefect.states import Failed

    from stages import openlineage

    ctx = FlowRunContext.get()
    lineage = openlineage.start(stage, params, flow_run_id=str(ctx.flow_run.id) if ctx and ctx.flow_run else None)
    try:
        module = import_stage(stage)
        with heartbeats(ctx.flow_run if ctx else None, _heartbeat_s[0]):
            manifest = RUNNERS[stage][1](module, params)
    except InputError as exc:
        openlineage.fail(lineage, str(exc))
        return Failed(message=str(exc), name=INPUT_ERROR)
    except BaseException as exc:  # a bug: FAIL with its stack, then its traceback as before
        import traceback

        openlineage.fail(lineage, f"{type(exc).__name__}: {exc}", stack_trace=traceback.format_exc())
        raise
    openlineage.complete(lineage, manifest)
    return {"artifact": manifest["artifact"], "digest": manifest["digest"]}


_flow: list = []


def stage_flow():
    """The stage's Prefect flow, `neon-stage` (made on first use: it needs Prefect imported)."""
    if not _flow:
        from prefect import flow

        _flow.append(flow(name=FLOW_NAME, log_prints=True, persist_result=False)(stage_flow_fn))
    return _flow[0]


def run_stage_flow(stage: str, params: Params):
    """The stage's flow run, named after the stage, as a child of the pipeline's flow run when
    NEON_PARENT_FLOW_RUN_ID names one (flows/pipeline.py sets it for `dvc repro`): like Prefect's own nested
    flows, a tracking task run in the parent and the stage's flow run created with it as `parent_task_run_id`
    (the server mirrors the child's state onto it). Without the variable, or when the parent cannot be
    reached, it is a flow run of its own. The tracker and the flow run (its parameters serialised by pydantic)
    are created in the client session that Prefect's engine then runs the flow on."""
    from uuid import UUID, uuid4

    from prefect import Task
    from prefect.context import SyncClientContext
    from prefect.flow_engine import run_flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
    from prefect.states import Pending

    flow = stage_flow()
    arguments = {"stage": stage, "params": params}
    recorded = {"stage": stage, "params": params.model_dump(mode="json")}  # what the UI shows as the run's parameters
    parent = os.environ.get(PARENT_ENV, "").strip()
    if not get_current_settings().api.url:  # flows/__init__.py found no server of `neon prefect up`
        from flows import SERVICES

        print(f"note: no local Prefect server runs for {SERVICES} (`neon prefect up` starts one); Prefect starts "
              "a temporary one for this stage, which takes 10-20 s", file=sys.stderr)
    _heartbeat_s[0] = get_current_settings().flows.heartbeat_frequency
    # Prefect's heartbeat thread off (`heartbeats` sends them instead); one client for the records and the engine
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
            SyncClientContext.get_or_create() as client_context:
        client = client_context.client
        tracker = None
        if parent:
            try:
                tracker = client.create_task_run(task=Task(name=flow.name, fn=flow.fn), flow_run_id=UUID(parent),
                                                 dynamic_key=f"{stage}-{uuid4().hex[:8]}", name=stage, state=Pending())
                run = client.create_flow_run(flow=flow, name=stage, parameters=recorded, parent_task_run_id=tracker.id,
                                             state=Pending())
            except Exception as exc:  # noqa: BLE001 - the stage still runs; only the link in the UI is lost
                print(f"warning: stage {stage} not linked to flow run {parent}: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
                tracker = None
        if tracker is None:
            run = client.create_flow_run(flow=flow, name=stage, parameters=recorded, state=Pending())
        return run_flow(flow, flow_run=run, parameters=arguments, return_type="state")


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
    if os.environ.get("WORLD_SIZE", "").strip() not in ("", "1"):  # started by torchrun
        from stages import distributed

        if distributed.size() > 1:
            if argv[0] not in DISTRIBUTED:
                print(f"error: stage {argv[0]} runs in one process (torchrun started {distributed.size()}); run it "
                      f"with `python -m flows {argv[0]}` (torchrun serves {', '.join(DISTRIBUTED)})", file=sys.stderr)
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
    try:
        RUNNERS[stage][1](import_stage(stage), params)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
