"""torch.distributed in `sample`, `train` and `finetune` (stages/distributed.py), started by torchrun with 2 gloo
processes on the CPU: the same synthetic set as one process, byte for byte; DDP fine-tuning with
`noise_streams: 2` equal to one process with `noise_streams: 2`; the default single-process loop unchanged;
a snapshot one process wrote resumed by two; a batch or a set of noise streams that the processes cannot
share refused in one line.

The stage functions run without Prefect, in fresh processes started by torchrun
(`python -m torch.distributed.run --standalone --nproc_per_node 2`), on a copy of the code and on the small
conditional inputs of tests/faults/test_resume_training.py (8x8 EDM with dropout and label dropout: every
random stream the loop has is exercised).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import family as families
from models.errors import InputError
from models.training import ema_update, fit, to_model_space
from stages import finetune, sample, snapshots
from stages.artifacts import read_manifest, verify
from stages.params import FinetuneParams, ModelParams, ParamsError, SampleParams, parse
from tests.faults.conftest import REPO
from tests.faults.test_resume_training import MODEL, SHAPE, make_inputs, model_config

SAMPLE = {"n": 48, "seed": 0, "shard_size": 16, "batch_size": 16, "sampler": {"edm": {"num_steps": 4}}}  # 3 shards
FINETUNE = {"steps": 6, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "ema_decay": 0.5, "seed": 1,
            "snapshot_every": 2, "noise_streams": 2}
# Max abs weight difference allowed between 2 DDP processes and one process, both with noise_streams 2.
# Measured here (AMD EPYC, torch 2.14.1, 1 thread per process): 0.0, bit-identical, also after a resume
# across world sizes: halving is exact in binary floating point, so gloo's (g0 + g1) / 2 is one process's
# g0 / 2 + g1 / 2. The tolerance leaves room for reductions that reorder additions (4 streams on 2
# processes, each summing 2 chunks, measured up to 1.3e-5 after 5 EDM steps).
TOLERANCE = 1e-6

RUNNER = r"""
import json, os, sys
from stages import finetune, sample
from stages.params import FinetuneParams, ModelParams, SampleParams
model = ModelParams.model_validate(json.loads(sys.argv[1]))
for folder, stage, p in json.loads(sys.argv[2]):
    os.chdir(folder)
    if stage == "sample":
        sample.run(SampleParams.model_validate(p), model)
    else:
        finetune.run(FinetuneParams.model_validate(p), model)
"""


def torchrun(base: Path, stages: list[tuple[Path, str, dict]]) -> str:
    """The `stages` ((folder, stage, params), in order) in 2 processes started by torchrun; their output."""
    env = {**os.environ, "PYTHONPATH": str(base / "code"), "OMP_NUM_THREADS": "1", "NEON_DEVICE": "cpu"}
    (base / "runner.py").write_text(RUNNER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(base / "runner.py"), json.dumps(MODEL),
                           json.dumps([[str(folder), stage, p] for folder, stage, p in stages])],
                          cwd=base, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def one_thread(monkeypatch):
    """One thread in this process, as in each torchrun process (the thread count changes training's last bits)."""
    with _one_process_conditions(monkeypatch):
        yield


@contextlib.contextmanager
def _one_process_conditions(mp: pytest.MonkeyPatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    mp.setenv("NEON_DEVICE", "cpu")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        mp.delenv(name, raising=False)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each stage in one process and in 2 torchrun processes, each in its own copy of the inputs: `sample`;
    `finetune` (noise_streams 2); and a one-process `finetune` stopped after its step-4 snapshot, which the
    2 processes then resume."""
    base = tmp_path_factory.mktemp("distributed")
    for package in ("models", "stages", "flows"):
        shutil.copytree(REPO / package, base / "code" / package, ignore=shutil.ignore_patterns("__pycache__"))
    make_inputs(base / "inputs")
    for name in ("one-sample", "one-finetune", "sample", "finetune", "resumed"):
        shutil.copytree(base / "inputs", base / name)
    model_p, sample_p, finetune_p = (ModelParams.model_validate(MODEL), SampleParams.model_validate(SAMPLE),
                                     FinetuneParams.model_validate(FINETUNE))
    write = snapshots.Snapshots.write

    def write_then_stop(self, state):
        write(self, state)
        if state["step"] == 4:
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp, _one_process_conditions(mp):
        mp.chdir(base / "one-sample")
        one = {"sample": sample.run(sample_p, model_p)}
        mp.chdir(base / "one-finetune")
        one["finetune"] = finetune.run(finetune_p, model_p)
        mp.chdir(base / "resumed")
        mp.setattr(snapshots.Snapshots, "write", write_then_stop)
        with pytest.raises(Interrupted):
            finetune.run(finetune_p, model_p)
    out = torchrun(base, [(base / "sample", "sample", SAMPLE), (base / "finetune", "finetune", FINETUNE),
                          (base / "resumed", "finetune", FINETUNE)])
    return base, one, out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "artifacts/selftrained/model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_draw_the_same_synthetic_set_as_one(runs):
    base, one, out = runs
    assert "(process 1 of 2)" in out and "this process draws 1" in out  # shards 0 and 2 to process 0, 1 to 1
    two = verify(base / "sample/artifacts/synthetic")
    assert two["digest"] == one["sample"]["digest"] and two["files"] == one["sample"]["files"]
    assert two["distributed"] == {"processes": 2, "backend": "gloo"} and "x 2 processes (gloo)" in two["device"]
    assert not list((base / "sample/.neon/work/sample").iterdir()), "the work folder outlived the published set"


def test_ddp_finetune_equals_one_process_with_as_many_noise_streams(runs):
    base, one, _ = runs
    two = read_manifest(base / "finetune/artifacts/selftrained")
    assert two["distributed"] == {"processes": 2, "backend": "gloo"} and one["finetune"]["params"] == two["params"]
    a, b = weights(base / "one-finetune"), weights(base / "finetune")
    assert max_difference(a, load_file(base / "inputs/artifacts/base/model.safetensors")) > 1e-4, "nothing trained"
    assert max_difference(a, b) <= TOLERANCE
    assert not list((base / "finetune/.neon/work/finetune").iterdir()), "the snapshots outlived the published model"


def test_two_processes_resume_a_snapshot_one_process_wrote(runs):
    """The snapshot holds every noise stream's state, whichever process computed it."""
    base, _, out = runs
    assert "[finetune] resuming from step 4 " in out
    assert max_difference(weights(base / "one-finetune"), weights(base / "resumed")) <= TOLERANCE


def _reference_loop(model, loss_fn, data, labels, *, steps, batch_size, lr, seed, ema_decay, label_dropout, null_label):
    """The training loop as it was before noise streams and processes existed (one process, one stream)."""
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    order, cursor = torch.randperm(data.shape[0], generator=gen), 0
    model.train()
    for _ in range(steps):
        if cursor + batch_size > data.shape[0]:
            order, cursor = torch.randperm(data.shape[0], generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        lab = labels[idx].clone()
        lab[torch.rand(len(idx), generator=gen) < label_dropout] = null_label
        loss = loss_fn(model, to_model_space(data[idx]), lab, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, ema_decay)
    return ema


def test_one_noise_stream_is_the_loop_it_always_was(one_thread):
    fam, config = families.get("edm"), model_config()
    images = (torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.arange(64) % 10
    kw = {"steps": 10, "batch_size": 8, "lr": 2e-3, "seed": 0, "ema_decay": 0.9, "label_dropout": 0.2,
          "null_label": 10}

    def trained(streams: int | None):
        torch.manual_seed(0)
        model = fam.build(config)
        if streams is None:
            return _reference_loop(model, fam.loss(config), images, labels, **kw).state_dict()
        return fit(model, fam.loss(config), images, labels, noise_streams=streams, **kw).state_dict()

    reference, one, two = trained(None), trained(1), trained(2)
    assert all(torch.equal(reference[k], one[k]) for k in reference), "noise_streams 1 changed the loop's bytes"
    assert not all(torch.equal(one[k], two[k]) for k in one), "a second noise stream changed nothing"


@pytest.mark.parametrize(("world", "changes", "key"), [
    (3, {}, "finetune.batch_size (16)"),
    (4, {}, "finetune.noise_streams (2)"),
])
def test_a_split_the_processes_cannot_share_is_refused_in_one_line(monkeypatch, world, changes, key):
    """Before any process group is joined: torchrun's environment alone decides."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError) as exc:
        finetune.run(FinetuneParams.model_validate({**FINETUNE, **changes}), ModelParams.model_validate(MODEL))
    message = str(exc.value)
    assert "\n" not in message and message.startswith(key) and f"the {world} processes torchrun started" in message


def test_noise_streams_must_divide_the_batch():
    with pytest.raises(ParamsError) as exc:
        parse({"train": {"batch_size": 64, "noise_streams": 3}})
    message = str(exc.value)
    assert "\n" not in message and "train.noise_streams" in message and "train.batch_size (64)" in message
