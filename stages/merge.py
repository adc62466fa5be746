"""Stage `merge`: theta_w = theta_base - w * (theta_s - theta_base) for every w in `merge.weights`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from models import checkpoint
from models.merge import merge
from stages.artifacts import artifact, input_ref, read_manifest
from stages.common import BASE, MERGED, MODEL_FILE, SELFTRAINED, log

if TYPE_CHECKING:  # annotations only: validating params (all families' schemas) is the entry point's job
    from stages.params import MergeParams


def merged_name(w: float) -> str:
    return f"w={w:g}.safetensors"


def run(p: MergeParams) -> dict:
    inputs = {"base": input_ref(BASE), "selftrained": input_ref(SELFTRAINED)}
    base, _ = checkpoint.read(BASE / MODEL_FILE)
    described = read_manifest(BASE)["checkpoint"]["config"]  # also set for plain state dicts
    selftrained, _ = checkpoint.read(SELFTRAINED / MODEL_FILE)
    with artifact(MERGED, "merge", p.model_dump(), inputs=inputs) as out:
        for w in p.weights:
            merged = merge(base, selftrained, w, method="neon", other_name=str(SELFTRAINED / MODEL_FILE))
            meta = {"neon_w": repr(w), "base_digest": inputs["base"]["digest"],
                    "selftrained_digest": inputs["selftrained"]["digest"]}
            checkpoint.save(out.path(merged_name(w)), merged, described["family"], described["config"], extra=meta)
            log(f"[merge] w = {w:g} -> {MERGED / merged_name(w)}")
    return out.manifest
