"""Flipped bytes in a checkpoint, a synthetic shard, a manifest or a cached evaluation result are found by
digest, named in the error, and no stage runs on them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages import evaluate, finetune, merge, sample
from stages.artifacts import ArtifactError, atomic_file, seal
from stages.common import BASE, MODEL_FILE, SELFTRAINED, SYNTHETIC
from tests.faults.conftest import REPO, flip_byte, tiny_params


def no_new_output(folder) -> None:
    assert not list(folder.parent.glob(f".{folder.name}.staging-*")), f"{folder}: a staging folder was left behind"


def test_a_flipped_byte_in_the_base_checkpoint_stops_sampling(workspace):
    p = tiny_params()
    before = (SYNTHETIC / "manifest.json").read_bytes()
    flip_byte(BASE / MODEL_FILE)
    with pytest.raises(ArtifactError, match=r"artifacts/base/model.safetensors has sha256 .* corrupted; restore it "
                                            r"with `dvc checkout artifacts/base`"):
        sample.run(p.sample, p.model)
    assert (SYNTHETIC / "manifest.json").read_bytes() == before, "the old set was replaced"
    no_new_output(SYNTHETIC)


def test_a_flipped_byte_in_a_synthetic_shard_stops_finetuning(workspace):
    p = tiny_params()
    shard = sorted(SYNTHETIC.glob("shard-*.npz"))[-1]
    flip_byte(shard)
    with pytest.raises(ArtifactError, match=f"{shard.as_posix()} has sha256"):
        finetune.run(p.finetune, p.model)
    no_new_output(SELFTRAINED)


@pytest.mark.parametrize("edit", ["flip", "value"])
def test_a_corrupted_manifest_is_refused(workspace, edit):
    """A manifest is checked against its own digest: a changed value is caught, not only broken JSON."""
    p = tiny_params()
    path = SELFTRAINED / "manifest.json"
    if edit == "flip":
        flip_byte(path, offset=5)
    else:
        manifest = json.loads(path.read_text())
        manifest["params"]["lr"] = 1.0
        path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="artifacts/selftrained/manifest.json is corrupted"):
        merge.run(p.merge)
    assert not (workspace / "artifacts" / "merged").exists()


def test_a_corrupted_manifest_beside_a_users_checkpoint_is_refused(workspace):
    """`fetch` trusts the digest a manifest beside the checkpoint lists only if that manifest is intact."""
    from stages import fetch
    from stages.common import TRAIN

    p = tiny_params()
    flip_byte(TRAIN / "manifest.json", offset=40)
    with pytest.raises(ArtifactError, match=r"artifacts/train/manifest.json is corrupted .* set base.sha256"):
        fetch.run(p.base, p.model)


def test_a_corrupted_cached_evaluation_result_is_refused_and_an_unfinished_one_redone(tmp_path):
    result = tmp_path / "0123.json"
    with atomic_file(result) as tmp:
        tmp.write_text(json.dumps({"w": 0.5, "classifier": {"fid": 12.5}}))
    seal(result)
    assert evaluate.cached(result)
    result.write_text(result.read_text().replace("12.5", "10.5"))  # same length: only the digest tells
    with pytest.raises(ArtifactError, match=f"cached evaluation result {result} does not match the digest"):
        evaluate.cached(result)
    unsealed = tmp_path / "4567.json"  # killed between writing the result and sealing it
    unsealed.write_text("{}")
    assert evaluate.cached(unsealed) is False


def test_the_cli_reports_corruption_in_one_line_and_exits_1(workspace, prefect_api):
    flip_byte(BASE / MODEL_FILE)
    (workspace / "params.yaml").write_text((REPO / "tests" / "tiny_params.yaml").read_text())
    env = {"PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
           "PREFECT_HOME": str(workspace / ".neon" / "prefect")}
    proc = subprocess.run([sys.executable, "-m", "flows", "sample"], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "artifacts/base/model.safetensors" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
