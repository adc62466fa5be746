"""SIGKILL `train` and `finetune` mid-run: the rerun resumes from the newest sealed snapshot and publishes a
model.safetensors byte-identical to a run nobody killed (same batches, noise, dropout, EMA, optimizer
moments); a snapshot that does not match its seal is never resumed.

The stages run in fresh processes on a copy of the code: the snapshots' folder is keyed by the code's
digest, so an edit to the working tree during the test must not make a rerun start over.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import checkpoint, family as families
from models.training import fit
from stages.artifacts import artifact, sha256_file
from stages.common import save_images
from stages.params import ModelParams
from stages.snapshots import Snapshots
from tests.faults.conftest import REPO, flip_byte, kill_when

# Conditional EDM with dropout and label dropout, 8x8 images: every RNG the loop uses is exercised,
# and a step takes tens of milliseconds. 64 images / 8 per batch: the data order reshuffles every 8
# steps, which snapshots every 5 steps cut across.
MODEL = {"family": "edm", "label_dim": 10, "label_dropout": 0.2,
         "edm": {"channels": [8, 16], "emb_dim": 16, "dropout": 0.1, "sigma_data": 0.5}}
SHAPE = [1, 8, 8]
PARAMS = {"train": {"steps": 36, "batch_size": 8, "lr": 2e-3, "ema_decay": 0.9, "seed": 0, "snapshot_every": 5},
          "finetune": {"steps": 36, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "ema_decay": 0.5, "seed": 1,
                       "snapshot_every": 5}}
OUTPUT = {"train": "artifacts/train", "finetune": "artifacts/selftrained"}

RUNNER = r"""
import json, sys
from stages import finetune, train
from stages.params import BaseParams, FinetuneParams, ModelParams, TrainParams
model = ModelParams.model_validate(json.loads(sys.argv[1]))
for stage, p in json.loads(sys.argv[2]).items():
    if stage == "train":
        train.run(model, TrainParams(**p), BaseParams())
    else:
        finetune.run(FinetuneParams(**p), model)
"""


def model_config() -> dict:
    return {**ModelParams.model_validate(MODEL).family_config(), "image_shape": SHAPE}


def make_inputs(root: Path, base_state=None) -> None:
    """artifacts/data (64 labelled 8x8 images), artifacts/base (an untrained model; `base_state` may edit its
    weights) and artifacts/synthetic (two shards) in `root`: what `train` and `finetune` read."""
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, *SHAPE, generator=gen) * 255).to(torch.uint8).numpy()
    labels = (np.arange(64) % 10).astype(np.int64)
    with artifact(root / "artifacts/data", "data", {}, inputs={}) as out:
        save_images(out.path("images.npz"), images, labels)
        out.extra["data"] = {"count": 64, "shape": SHAPE, "kind": "image", "classes": 10}
    config = model_config()
    torch.manual_seed(0)
    state = families.get("edm").build(config).state_dict()
    if base_state is not None:
        base_state(state)
    with artifact(root / "artifacts/base", "fetch", {}, inputs={}) as out:
        checkpoint.save(out.path("model.safetensors"), state, "edm", config)
    with artifact(root / "artifacts/synthetic", "sample", {}, inputs={}) as out:
        for start in (0, 32):
            save_images(out.path(f"shard-{start:08d}-{start + 32:08d}.npz"), images[start:start + 32][::-1].copy(),
                        labels[start:start + 32])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A copy of the code, the inputs, and the model digests of one uninterrupted run of each stage (no snapshots)."""
    base = tmp_path_factory.mktemp("resume")
    for package in ("models", "stages", "flows"):
        shutil.copytree(REPO / package, base / "code" / package, ignore=shutil.ignore_patterns("__pycache__"))
    make_inputs(base / "inputs")
    reference = project(base, "reference")
    proc = start(base, reference, {stage: {**p, "snapshot_every": 0} for stage, p in PARAMS.items()})
    assert proc.wait(timeout=300) == 0, output(reference)
    digests = {stage: sha256_file(reference / OUTPUT[stage] / "model.safetensors") for stage in PARAMS}
    return base, digests


def project(base: Path, name: str) -> Path:
    root = base / name
    shutil.copytree(base / "inputs", root)
    return root


def start(base: Path, root: Path, params: dict) -> subprocess.Popen:
    """The stages in `params` run in a fresh process in `root`; its output goes to root/run.log (appended)."""
    env = {**os.environ, "PYTHONPATH": str(base / "code"), "OMP_NUM_THREADS": "1", "NEON_DEVICE": "cpu"}
    with open(root / "run.log", "a") as log:
        log.write("=== run\n")
        log.flush()
        return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(MODEL), json.dumps(params)], cwd=root,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def output(root: Path, run: int = -1) -> str:
    return (root / "run.log").read_text().split("=== run\n")[run]


def snapshot_files(root: Path, stage: str) -> dict[int, Path]:
    files = (root / ".neon/work" / stage).glob("*/step-*.safetensors")
    return {int(re.search(r"step-(\d+)", p.name)[1]): p for p in files}


def sealed_steps(root: Path, stage: str) -> list[int]:
    return sorted(step for step, p in snapshot_files(root, stage).items() if Path(f"{p}.sha256").exists())


@pytest.mark.parametrize("stage", PARAMS)
def test_a_stage_killed_twice_resumes_and_publishes_the_same_model(setup, stage):
    base, reference = setup
    root = project(base, f"killed-{stage}")
    p = PARAMS[stage]

    proc = start(base, root, {stage: p})
    assert kill_when(proc, lambda: sealed_steps(root, stage)), f"{stage} finished before the first kill"
    assert not (root / OUTPUT[stage]).exists(), "a killed run published its model"
    first = max(sealed_steps(root, stage))

    # Second kill: as soon as a newer snapshot's file appears, often before it is sealed.
    proc = start(base, root, {stage: p})
    assert kill_when(proc, lambda: max(snapshot_files(root, stage), default=0) > first), f"{stage} finished too soon"
    assert f"[{stage}] resuming from step {first} " in output(root)
    steps = sealed_steps(root, stage)
    assert len(steps) <= 2, f"more than the last 2 snapshots kept: {steps}"
    second = max(steps)
    unsealed = [s for s in snapshot_files(root, stage) if s > second]

    # snapshot_every is not part of the folder's key: the last run takes none and still resumes.
    proc = start(base, root, {stage: {**p, "snapshot_every": 0}})
    assert proc.wait(timeout=300) == 0, output(root)
    log = output(root)
    assert f"[{stage}] resuming from step {second} " in log, log
    if unsealed:
        assert "ignoring snapshot" in log and "incomplete or corrupted" in log, log
    assert sha256_file(root / OUTPUT[stage] / "model.safetensors") == reference[stage]
    assert not list((root / ".neon/work" / stage).iterdir()), "the snapshots outlived the published model"


def test_a_corrupted_snapshot_is_not_resumed(setup):
    base, reference = setup
    root = project(base, "corrupted")
    proc = start(base, root, {"train": PARAMS["train"]})
    assert kill_when(proc, lambda: len(sealed_steps(root, "train")) >= 2), "train finished before the kill"
    older, newest = sealed_steps(root, "train")[-2:]
    newest_file = snapshot_files(root, "train")[newest]
    flip_byte(newest_file)

    proc = start(base, root, {"train": PARAMS["train"]})
    assert proc.wait(timeout=300) == 0, output(root)
    log = output(root)
    assert f"[train] ignoring snapshot {newest_file.relative_to(root)}: incomplete or corrupted" in log, log
    assert f"[train] resuming from step {older} " in log, log
    assert f"resuming from step {newest}" not in log
    assert sha256_file(root / OUTPUT["train"] / "model.safetensors") == reference["train"]


def test_snapshots_round_trip_the_optimizer_and_keep_the_last_two(tmp_path, capsys):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    snaps = Snapshots(tmp_path, "train")
    for step in (5, 10, 15):
        snaps.write({"step": step, "running": 0.1 + step, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()})
    assert sorted(p.name for p in tmp_path.glob("step-*.safetensors")) == ["step-00000010.safetensors",
                                                                          "step-00000015.safetensors"]
    state = snaps.latest()
    assert state["step"] == 15 and state["running"] == 15.1 and torch.equal(state["rng"], torch.get_rng_state())
    saved = opt.state_dict()
    assert state["optimizer"]["param_groups"] == saved["param_groups"]  # int keys and tuples (betas) survive JSON
    for pid, values in saved["state"].items():
        for name, value in values.items():
            assert torch.equal(state["optimizer"]["state"][pid][name], value)
    torch.optim.AdamW(net.parameters(), lr=1e-2).load_state_dict(state["optimizer"])

    (tmp_path / "step-00000015.safetensors.sha256").unlink()  # as a kill between the file and its seal leaves it
    assert snaps.latest()["step"] == 10
    assert "ignoring snapshot" in capsys.readouterr().out
    flip_byte(tmp_path / "step-00000010.safetensors")
    assert snaps.latest() is None


def test_a_resumed_loop_continues_exactly(tmp_path):
    """In process, to the last bit: the losses fit reports after resuming, and the whole state at a later
    snapshot (weights, EMA, optimizer moments, RNG states, data order, loss accumulator) as bytes."""
    fam, config = families.get("edm"), model_config()
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(64, *SHAPE, generator=gen) * 255).to(torch.uint8)
    labels = torch.arange(64) % 10

    class Killed(Exception):
        pass

    def run(folder: Path, stop_after: int = 0) -> list[tuple[int, float]]:
        snaps, losses = Snapshots(folder, "train"), []

        def on_snapshot(state):
            snaps.write(state)
            if state["step"] == stop_after:
                raise Killed

        torch.manual_seed(0)
        try:
            fit(fam.build(config), fam.loss(config), images, labels, steps=24, batch_size=8, lr=2e-3, seed=0,
                ema_decay=0.9, label_dropout=0.2, null_label=10, log_every=5, snapshot_every=7,
                progress=lambda step, total, figures: losses.append((step, figures["loss"])),
                on_snapshot=on_snapshot, resume=snaps.latest())
        except Killed:
            pass
        return losses

    whole = run(tmp_path / "whole")
    assert run(tmp_path / "killed", stop_after=7) == whole[:1]  # step 5
    resumed = run(tmp_path / "killed")
    assert resumed == whole[1:]  # steps 10, 15, 20, 24: the step-10 mean spans the resume
    for name in ("step-00000014.safetensors", "step-00000021.safetensors"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
