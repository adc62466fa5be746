"""models/checkpoint.py with models/edm.py and models/family.py: safetensors only, self-describing."""
import json
import random

import pytest
import torch
from safetensors.torch import save_file

from models import edm, family
from models.checkpoint import CheckpointError, load_model, read, save

CONFIG = {"channels": [8, 16], "emb_dim": 16, "image_shape": [1, 28, 28], "sigma_data": 0.5, "dropout": 0.0}


def tiny_edm(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    model = edm.build(config)
    with torch.no_grad():  # conv_out starts at zero: make the network's output depend on its weights
        model.net.conv_out.weight.add_(torch.randn_like(model.net.conv_out.weight) * 0.1)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = tiny_edm()
    path = tmp_path / "model.safetensors"
    save(path, model.state_dict(), "edm", CONFIG, extra={"note": "hi"})
    return model, path


def test_round_trip_metadata(saved):
    model, path = saved
    state, meta = read(path)
    assert meta["family"] == "edm" and meta["note"] == "hi"
    assert meta["format"] == "neon-checkpoint/1"
    assert json.loads(meta["config"]) == CONFIG
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_load_model_same_outputs(saved):
    model, path = saved
    loaded, fam, config = load_model(path, expect={"family": "edm", "channels": [8, 16]})
    assert fam is family.get("edm") and config == CONFIG and not loaded.training
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), model(x, sigma))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_refused(tmp_path, zip_format):
    path = tmp_path / "model.pt"
    torch.save(tiny_edm().state_dict(), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        load_model(path)


@pytest.mark.parametrize("data", [random.Random(0).randbytes(4096), b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "])
def test_garbage_refused(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read(path)


def test_other_architecture_refused_by_expect(tmp_path):
    path = tmp_path / "big.safetensors"
    big = {**CONFIG, "channels": [16, 32]}
    save(path, tiny_edm(big).state_dict(), "edm", big)
    with pytest.raises(CheckpointError, match=r"channels=\[16, 32\].*\[8, 16\]"):
        load_model(path, expect={"family": "edm", "channels": [8, 16]})


def test_plain_state_dict_with_wrong_fallback(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(tiny_edm({**CONFIG, "channels": [16, 32]}).state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"tensor `[\w.]+`"):
        load_model(path, fallback=("edm", CONFIG))


def test_plain_state_dict_with_right_fallback(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(tiny_edm().state_dict(), str(path))
    model, _, config = load_model(path, fallback=("edm", CONFIG))
    assert config == CONFIG
    with pytest.raises(CheckpointError, match="no `family`/`config` metadata"):
        load_model(path)


def test_missing_tensor_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    state = tiny_edm().state_dict()
    del state["net.conv_out.bias"]
    save(path, state, "edm", CONFIG)
    with pytest.raises(CheckpointError, match=r"net\.conv_out\.bias.*missing"):
        load_model(path)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'gan'.*edm"):
        family.get("gan")
    path = tmp_path / "gan.safetensors"
    save(path, tiny_edm().state_dict(), "gan", CONFIG)
    with pytest.raises(ValueError, match="unknown model family 'gan'"):
        load_model(path)
