"""Stage `merge`: the Neon model theta_w = theta_base - w * (theta_s - theta_base), written once.

It runs after `evaluate`, which searched w with every candidate merged in memory: the model it writes
is at the evaluation's best w (`merge.w: best`) or at a w the user names. `merge.keep_sweep` also
writes one checkpoint per sweep weight; every output comes from the same single pass over the inputs.
"""
from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

from models.merge import merge_files
from stages.artifacts import artifact, input_ref, read_manifest
from stages.common import BASE, EVALUATE, MERGED, MODEL_FILE, SELFTRAINED, log

if TYPE_CHECKING:  # annotations only: validating params (all families' schemas) is the entry point's job
    from stages.params import MergeParams


def merged_name(w: float) -> str:
    return f"w={w:g}.safetensors"


def chosen(p: MergeParams, evaluation: dict) -> tuple[float, str]:
    """(w, why): the evaluation's best w, or the one `merge.w` names."""
    if p.w == "best":
        return float(evaluation["best_w"]), "best w of the evaluation"
    return float(p.w), "merge.w"


def run(p: MergeParams) -> dict:
    inputs = {"base": input_ref(BASE), "selftrained": input_ref(SELFTRAINED), "evaluate": input_ref(EVALUATE)}
    evaluation = json.loads((EVALUATE / "evaluation.json").read_text())
    w, why = chosen(p, evaluation)
    described = read_manifest(BASE)["checkpoint"]["config"]  # also set for plain state dicts
    sweep = [x for x in p.weights if p.keep_sweep]
    provenance = {"base_digest": inputs["base"]["digest"], "selftrained_digest": inputs["selftrained"]["digest"]}
    with artifact(MERGED, "merge", p.model_dump(), inputs=inputs) as out:
        # One pass over the memory-mapped inputs writes every output, tensor by tensor (sharded past 5 GB).
        targets = {w: out.path(MODEL_FILE), **{x: out.path(merged_name(x)) for x in sweep if x != w}}
        written = merge_files(BASE / MODEL_FILE, SELFTRAINED / MODEL_FILE, targets, method="neon",
                              other_name=str(SELFTRAINED / MODEL_FILE), family=described["family"],
                              config=described["config"], extra=provenance)
        if w in sweep and written[w] == [out.path(MODEL_FILE)]:  # also a sweep weight: the same bytes, both names
            shutil.copyfile(out.path(MODEL_FILE), out.path(merged_name(w)))
        out.extra["neon"] = _summary(w, why, evaluation)
    if w == 0:
        log("[merge] the evaluation found no w better than the base: the Neon model is the base itself (w = 0)")
    log(f"[merge] w = {w:g} ({why}) -> {MERGED / MODEL_FILE}"
        + (f"; sweep checkpoints: {', '.join(merged_name(x) for x in sweep)}" if sweep else ""))
    return out.manifest


def _summary(w: float, why: str, evaluation: dict) -> dict:
    """What a user of the model asks first: its w, why that w, how to sample it, what it scored."""
    primary = evaluation["primary_space"]
    confirm = evaluation["confirm"][primary]
    at_best = w == evaluation["best_w"]
    return {"w": w, "chosen_by": why, "guidance": evaluation["best_guidance"] if at_best else evaluation["base_guidance"],
            "fid_space": primary,
            "fid_base": confirm["base"]["fid_mean"], "fid_neon": confirm["neon"]["fid_mean"] if at_best else None,
            "verdict": confirm["gain"]["verdict"] if at_best else None, "seed_runs": evaluation["seeds"]}
