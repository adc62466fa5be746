"""NaN/inf in training stops `train` or `finetune` with one line naming the stage, the step or tensor and
the fix; nothing is published, and no snapshot is left for a rerun to resume the broken state from."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models import family as families
from models.errors import InputError, NonFiniteError
from models.training import fit
from stages import finetune, train
from stages.common import SELFTRAINED, TRAIN, WORK
from stages.params import BaseParams, FinetuneParams, ModelParams, TrainParams
from tests.faults.test_resume_training import MODEL, make_inputs

TRAIN_P = {"steps": 12, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "seed": 0, "snapshot_every": 4}


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def edm_with(monkeypatch, **fields) -> None:
    """Replace parts of the registered edm family for this test."""
    monkeypatch.setitem(families._REGISTRY, "edm", dataclasses.replace(families.get("edm"), **fields))


def nothing_published(folder, stage: str) -> None:
    assert not folder.exists(), f"{folder} was published"
    assert not list(folder.parent.glob(f".{folder.name}.*")), "a staging folder was left behind"
    assert not list(WORK.glob(f"{stage}/*/step-*")), "a snapshot was left for a rerun to resume"


def test_a_nan_loss_stops_train_naming_the_step_and_leaves_nothing_to_resume(inputs, monkeypatch):
    real = families.get("edm").loss
    calls = []

    def loss(config):
        inner = real(config)

        def nan_at_step_9(model, batch, labels, gen):
            calls.append(1)
            value = inner(model, batch, labels, gen)
            return value * math.nan if len(calls) == 9 else value
        return nan_at_step_9

    edm_with(monkeypatch, loss=loss)
    with pytest.raises(NonFiniteError) as err:
        train.run(ModelParams.model_validate(MODEL), TrainParams(**TRAIN_P), BaseParams())
    assert isinstance(err.value, InputError)
    assert str(err.value) == "stage train: training loss became nan at step 9; lower the learning rate (train.lr)"
    nothing_published(TRAIN, "train")  # the snapshots of steps 4 and 8 included: the rerun would fail the same way


def test_non_finite_weights_are_never_snapshotted():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    data = torch.randn(32, 4)

    def poison(step, total, figures):  # after step 8's update, before its snapshot
        if step == 8:
            with torch.no_grad():
                net[1].weight[0, 3] = math.inf

    written = []
    with pytest.raises(NonFiniteError, match=r"^weights became NaN/inf at step 8 \(model tensor `1.weight`\); "
                                             r"lower the learning rate$"):
        fit(net, lambda m, x, lab, gen: m(x).pow(2).mean(), data, None, steps=20, batch_size=8, lr=1e-2, seed=0,
            ema_decay=0.5, progress=poison, log_every=1, snapshot_every=4,
            on_snapshot=lambda state: written.append(state["step"]))
    assert written == [4]


def test_a_non_finite_final_model_is_not_published(inputs, monkeypatch):
    built = []
    real_build = families.get("edm").build
    edm_with(monkeypatch, build=lambda config: built.append(real_build(config)) or built[-1])

    def progress(label):
        def poison_last_step(step, total, figures=None):
            if step == total:
                with torch.no_grad():
                    built[0].get_parameter("net.conv_out.bias").fill_(math.nan)
        return poison_last_step

    monkeypatch.setattr(train, "progress", progress)
    with pytest.raises(NonFiniteError) as err:  # no EMA: the raw weights are the model
        train.run(ModelParams.model_validate(MODEL), TrainParams(**{**TRAIN_P, "ema_decay": 0.0}), BaseParams())
    assert str(err.value) == ("stage train: the trained model's tensor `net.conv_out.bias` holds NaN or inf; "
                              "lower the learning rate (train.lr)")
    nothing_published(TRAIN, "train")


def test_finetune_refuses_a_base_checkpoint_with_an_inf_weight(tmp_path, monkeypatch):
    make_inputs(tmp_path, base_state=lambda state: state["net.conv_out.weight"].view(-1)[5].fill_(math.inf))
    monkeypatch.chdir(tmp_path)
    p = FinetuneParams(steps=4, batch_size=8, snapshot_every=2)
    with pytest.raises(NonFiniteError) as err:
        finetune.run(p, ModelParams.model_validate(MODEL))
    assert isinstance(err.value, InputError)
    assert str(err.value) == ("stage finetune: the base checkpoint artifacts/base/model.safetensors holds NaN or inf in "
                              "tensor `net.conv_out.weight`; retrain the base with a lower train.lr or fetch a finite checkpoint")
    nothing_published(SELFTRAINED, "finetune")
