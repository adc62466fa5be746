"""models/consistency.py: boundary condition, iCT loss on real digits, multistep sampling, checkpoints."""
import pytest
import torch
from pydantic import ValidationError

from models import checkpoint, consistency, family
from models.merge import merge
from models.sampling import class_labels, generate
from models.training import fit
from stages.data import _mnist_5k

SHAPE = (1, 28, 28)
CONFIG = {**consistency.ConsistencyConfig(channels=[8, 16], emb_dim=16).model_dump(),
          "image_shape": list(SHAPE), "label_dim": 0, "label_dropout": 0.0}


def tiny(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    model = consistency.build(config)
    with torch.no_grad():  # conv_out starts at zero: make the output depend on the network
        model.net.conv_out.weight.add_(torch.randn_like(model.net.conv_out.weight) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def digits():
    images, labels, _ = _mnist_5k()
    return torch.from_numpy(images), torch.from_numpy(labels)


def test_boundary_condition_is_exact(model):
    x = torch.randn(4, *SHAPE) * 3
    with torch.no_grad():
        assert torch.equal(model(x, torch.full((4,), model.sigma_min)), x)
        assert not torch.allclose(model(x, torch.full((4,), 1.0)), x)  # elsewhere the network matters


def test_loss_differentiable_and_decreases_on_digits(digits):
    images, _ = digits
    model = tiny(seed=1).train()
    loss_fn = consistency.loss(CONFIG)
    batch = images[:32].float() / 127.5 - 1
    value = loss_fn(model, batch, None, torch.Generator().manual_seed(0))
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    fixed = lambda m: consistency.loss(CONFIG)(m, batch, None, torch.Generator().manual_seed(123)).item()
    before = fixed(model.eval())
    trained = fit(model, loss_fn, images[:512], None, steps=30, batch_size=32, lr=2e-3, seed=0)
    assert fixed(trained) < 0.9 * before


def test_loss_is_self_consistency(digits):
    """Any f that agrees with itself along the trajectory has zero loss; a mismatch along it does not."""
    batch = digits[0][:8].float() / 127.5 - 1
    loss_fn = consistency.loss(CONFIG)
    constant = lambda x, sigma, labels: torch.zeros_like(x)
    assert loss_fn(constant, batch, None, torch.Generator().manual_seed(0)) < 1e-6
    identity = lambda x, sigma, labels: x
    assert loss_fn(identity, batch, None, torch.Generator().manual_seed(0)) > 1


def gen(model, fam_settings, seeds, batch_size, labels=None):
    return generate(model, consistency.FAMILY, fam_settings, SHAPE, seeds, batch_size, labels=labels)


@pytest.mark.parametrize("steps", [1, 4])
def test_sampling_shape_finite_and_per_seed(model, steps):
    settings = consistency.MultistepSettings(num_steps=steps)
    seeds = list(range(20, 26))
    together = gen(model, settings, seeds, 6)
    assert together.shape == (6, *SHAPE) and together.dtype == torch.uint8
    assert together.float().std() > 0 and not torch.equal(together[0], together[1])
    apart = torch.cat([gen(model, settings, seeds[:2], 2), gen(model, settings, seeds[2:], 4)])
    assert (together.int() - apart.int()).abs().max() <= 1  # at most float rounding between batches
    raw = consistency.sample(model, torch.randn(3, *SHAPE), settings, noise=lambda shape: torch.randn(shape))
    assert raw.dtype == torch.float32 and torch.isfinite(raw).all()


def test_steps_change_samples(model):
    one, four = (gen(model, consistency.MultistepSettings(num_steps=k), [5, 6], 2) for k in (1, 4))
    assert not torch.equal(one, four)


@pytest.mark.parametrize("bad", [{"num_steps": 0}, {"num_steps": 9}, {"sigma_low": 3.0, "sigma_high": 1.0},
                                 {"unknown": 1}])
def test_settings_rejected(bad):
    with pytest.raises(ValidationError):
        consistency.MultistepSettings(**bad)


def test_renoise_levels():
    levels = consistency.renoise_levels(consistency.MultistepSettings(num_steps=5, sigma_high=4.0, sigma_low=0.5))
    assert len(levels) == 4 and levels[0] == pytest.approx(4.0) and levels[-1] == pytest.approx(0.5)
    assert levels == sorted(levels, reverse=True)
    assert consistency.renoise_levels(consistency.MultistepSettings(num_steps=2, sigma_low=0.7)) == [0.7]
    assert consistency.renoise_levels(consistency.MultistepSettings(num_steps=1)) == []


def test_conditional_with_guidance():
    config = {**CONFIG, "label_dim": 3, "label_dropout": 0.1}
    model = tiny(config)
    with torch.no_grad():  # labels must reach the output
        model.net.label_embed.weight.mul_(10)
    labels = class_labels(range(6), 3)
    settings = consistency.MultistepSettings(num_steps=2, guidance=2.0)
    out = gen(model, settings, list(range(6)), 6, labels)
    assert out.shape == (6, *SHAPE)
    plain = gen(model, settings.model_copy(update={"guidance": 1.0}), list(range(6)), 6, labels)
    assert not torch.equal(out, plain)


def test_checkpoint_round_trip_and_merge(model, tmp_path, monkeypatch):
    monkeypatch.setattr(family, "BUILTIN", ())  # look up only what is registered (this module)
    path = tmp_path / "cm.safetensors"
    checkpoint.save(path, model.state_dict(), "consistency", CONFIG)
    loaded, fam, config = checkpoint.load_model(path, expect={"family": "consistency", "channels": [8, 16]})
    assert fam is consistency.FAMILY and config == CONFIG
    assert (loaded.sigma_min, loaded.sigma_max) == (model.sigma_min, model.sigma_max)
    x, sigma = torch.randn(2, *SHAPE), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), model(x, sigma))

    other = tiny(seed=3).state_dict()
    merged = merge(model.state_dict(), other, 0.5)
    assert merged.keys() == other.keys()
    key = "net.conv_out.weight"
    assert torch.allclose(merged[key], model.state_dict()[key] - 0.5 * (other[key] - model.state_dict()[key]))
    loaded.load_state_dict(merged)
    settings = consistency.MultistepSettings(num_steps=2)
    assert gen(loaded, settings, [1, 2], 2).shape == (2, *SHAPE)
