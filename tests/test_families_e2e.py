"""Every model family through the DAG on the tiny preset, and a diffusers UNet2DModel folder built by
the diffusers library, served from the real SeaweedFS.

`dvc exp run --temp -S model.family=<f>` runs here for every family with NEON_EXP_ALL_FAMILIES=1 (about
8 minutes); by default none does, since every family runs through the same stage functions in-process,
and a `--temp` experiment runs the DAG in tests/test_experiments_shared.py.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import restored, run, set_params

pytestmark = pytest.mark.e2e

QUICK = ["evaluate.inception_n=0", "evaluate.refine=0", "evaluate.bootstrap=0"]  # the DAG, not the statistics
POINTS = ["data.source=toy2d", "reference.inception_n=0", "evaluate.n=200",
          "train.steps=300", "train.batch_size=600", "train.ema_decay=0"]
FAMILIES = {  # the tiny preset holds each family's small architecture; points need the toy data
    "flow": [],
    "consistency": [],
    "ar": [],
    "diffusers": ["+model.diffusers.unet={block_out_channels: [8, 16], layers_per_block: 1, norm_num_groups: 4, "
                  "down_block_types: [DownBlock2D, DownBlock2D], up_block_types: [UpBlock2D, UpBlock2D]}"],
    "toy_diffusion": POINTS + ["finetune.lr=0.00001", "+evaluate.sampler.zeta=1.0"],
    "toy_ar": POINTS + ["train.lr=0.0005", "+evaluate.sampler.tau=1.0", "merge.weights=[-0.2,0.2]"],
}


def latest_experiment_metrics(root, env) -> dict:
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    newest = exps[0]["revs"][0]["data"]
    return newest["metrics"]["results/metrics.json"]["data"]


def overrides_for(family: str) -> dict:
    import yaml

    pairs = (o.lstrip("+").split("=", 1) for o in [f"model.family={family}", *QUICK, *FAMILIES[family]])
    return {k: yaml.safe_load(v) for k, v in pairs}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_through_every_stage(family, tmp_path, monkeypatch):
    """The stage functions `dvc repro` runs, in order, in a fresh folder: data -> ... -> evaluate."""
    import yaml

    from stages import params
    from tests.conftest import TINY, run_stages

    raw = params.with_overrides(yaml.safe_load(TINY.read_text()), overrides_for(family))
    raw["reference"]["inception_n"] = 0
    p = params.parse(raw)
    monkeypatch.chdir(tmp_path)
    run_stages(p)
    result = json.loads((tmp_path / "artifacts/evaluate/evaluation.json").read_text())
    assert result["family"] == family
    primary = result["primary_space"]
    assert primary == ("raw" if family.startswith("toy") else "classifier")
    check_outputs(p, tmp_path, result)


def check_outputs(p, root, result) -> None:
    """What a wrong stage would break: the set's size and spread, the merge formula on the real
    checkpoints, the sweep and its argmin, and the confirmation runs behind the reported means."""
    import numpy as np
    import torch

    from models import checkpoint
    from stages.sample import load_synthetic

    images, _ = load_synthetic()  # the test runs in `root`
    assert len(images) == p.sample.n and np.isfinite(images.astype(np.float64)).all()
    assert images.astype(np.float64).std() > 0 and len(np.unique(images.reshape(len(images), -1), axis=0)) == p.sample.n
    base, _ = checkpoint.read(root / "artifacts/base/model.safetensors")
    tuned, _ = checkpoint.read(root / "artifacts/selftrained/model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base), "fine-tuning changed no weight"
    merged, meta = checkpoint.read(root / "artifacts/merged/model.safetensors")
    w = float(meta["neon_w"])
    assert w == result["best_w"]  # merge.w: best
    for k, b in base.items():
        if b.is_floating_point():
            torch.testing.assert_close(merged[k], b - w * (tuned[k] - b), rtol=1e-5, atol=1e-6)
    primary = result["primary_space"]
    sweep = {r["w"]: r["fid"] for r in result["sweep"] if r["stage"] == "sweep"}
    assert set(sweep) == {0.0, *p.merge.weights}
    assert result["best_w"] == min(result["sweep"], key=lambda r: r["fid"])["w"]
    for label in ("base", "neon"):
        runs = result["confirm"][primary][label]["fid_runs"]
        assert len(runs) == p.evaluate.seeds and all(f > 0 for f in runs)
        assert result["confirm"][primary][label]["fid_mean"] == pytest.approx(sum(runs) / len(runs))
    check_measurements(root, result)
    if result["best_w"] == 0:  # the same model on the same seeds: exactly no difference
        assert result["confirm"][primary]["gain"]["mean"] == 0



# Every family also runs in-process above, and test_experiments_shared.py runs a `--temp` experiment of the
# DAG; NEON_EXP_ALL_FAMILIES=1 runs every family's experiment too (about 8 minutes).
EXPERIMENTS = list(FAMILIES) if os.environ.get("NEON_EXP_ALL_FAMILIES") == "1" else []


@pytest.mark.parametrize("family", EXPERIMENTS)
def test_family_runs_as_a_dvc_experiment(reproduced, family):
    root, env, _ = reproduced
    overrides = [arg for o in [f"model.family={family}", *QUICK, *FAMILIES[family]] for arg in ("-S", o)]
    proc = run(["dvc", "exp", "run", "--temp", *overrides], root, env)
    assert f"Model family: {family}." in proc.stdout + proc.stderr
    metrics = latest_experiment_metrics(root, env)
    space = "raw" if family.startswith("toy") else "classifier"
    assert metrics[space]["fid_base"] > 0 and "best_w" in metrics


def _diffusers_folder(path):
    """A tiny 28x28x1 UNet2DModel and its DDPM scheduler, saved by diffusers itself (pipeline layout)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def test_diffusers_folder_from_s3_runs_fetch_to_evaluate(reproduced, s3_store, tmp_path):
    from stages import store
    from stages.artifacts import directory_digest, sha256_file

    root, env, _ = reproduced
    folder = _diffusers_folder(tmp_path / "ddpm")
    fs = store.filesystem(s3_store.endpoint)
    fs.put(str(folder) + "/", "neon/user/ddpm/", recursive=True)
    digest = directory_digest({p.relative_to(folder).as_posix(): sha256_file(p)
                               for p in folder.rglob("*") if p.is_file()})
    with restored(root, env):
        set_params(root, **{"model.family": "diffusers", "base.checkpoint": "s3://neon/user/ddpm",
                            "base.sha256": digest, **dict(o.split("=") for o in QUICK)})  # the DAG, not statistics
        proc = run(["dvc", "repro"], root, env)
        assert "[train] skipped" in proc.stdout + proc.stderr
        assert "Model family: diffusers." in proc.stdout + proc.stderr
        base = json.loads((root / "artifacts/base/manifest.json").read_text())
        assert base["inputs"]["checkpoint"] == {"path": "s3://neon/user/ddpm", "sha256": digest, "folder": True,
                                                "files": base["inputs"]["checkpoint"]["files"]}
        assert base["checkpoint"]["config"]["family"] == "diffusers"
        metrics = json.loads((root / "results/metrics.json").read_text())
        assert metrics["classifier"]["fid_base"] > 0
        # A pickled-only folder is refused with the conversion command, before anything is loaded.
        fs.rm("neon/user/ddpm/unet/diffusion_pytorch_model.safetensors")
        fs.pipe("neon/user/ddpm/unet/diffusion_pytorch_model.bin", b"\x80\x04pickle")
        files = {**{p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}}
        files.pop("unet/diffusion_pytorch_model.safetensors")
        import hashlib

        files["unet/diffusion_pytorch_model.bin"] = hashlib.sha256(b"\x80\x04pickle").hexdigest()
        set_params(root, **{"base.sha256": directory_digest(files)})
        proc = run(["dvc", "repro", "fetch"], root, env, check=False)
        assert proc.returncode and "safe_serialization=True" in proc.stdout + proc.stderr


def check_measurements(root, result) -> None:
    """measurements.csv holds every measurement the evaluation made, with the values evaluation.json reports."""
    import pandas as pd

    table = pd.read_csv(root / "artifacts/evaluate/measurements.csv")
    primary = result["primary_space"]
    curve = table[table["stage"].isin(["sweep", "refine"])].sort_values(["guidance", "w"])
    assert curve["fid"].tolist() == [r["fid"] for r in result["sweep"]]
    assert (curve["space"] == primary).all() and (curve["seed_run"] == 0).all()
    for space, summary in result["confirm"].items():
        for label in ("base", "neon"):
            runs = table[(table["stage"] == f"confirm {label}") & (table["space"] == space)].sort_values("seed_run")
            assert runs["fid"].tolist() == summary[label]["fid_runs"]
            assert runs["seed_run"].tolist() == list(range(1, result["seeds"] + 1))
    assert not table.duplicated(["stage", "w", "guidance", "seed_run", "space"]).any()
