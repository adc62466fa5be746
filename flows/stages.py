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
from prefect.states import Failed

from models.errors import InputError
from stages.common import EVALUATE
from stages.params import Params, ParamsError, load

INPUT_ERROR = "InputError"  # the name of a flow run's Failed state when the user's input, not the code, is at fault


def task_step(name: str, fn, *args):
    """Run a stage's sub-step as a Prefect task (visible, retried); its result cache is the stage's own."""
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
    "evaluate": ("stages.evaluate", lambda m, p: publish_report(m.run(p.evaluate, p.sample, p.model, step=task_step))),
}


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
    state = stage_flow(argv[0], params, return_state=True)
    if state.is_failed() and state.name == INPUT_ERROR:
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    state.result()  # a bug: re-raises the flow's exception, so its traceback reaches the user
    return 0
