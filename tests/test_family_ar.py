"""models/ar.py: tokens, KV-cache consistency, likelihood training on real digits, inverse-CDF sampling."""
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from models import ar, checkpoint, family
from models.merge import merge
from models.sampling import PerSampleNoise, class_labels, generate
from models.training import fit, to_unit_range
from stages.data import _mnist_5k

SHAPE = (1, 8, 8)
CONFIG = {**ar.ARConfig(levels=4, dim=16, depth=1, heads=2).model_dump(),
          "image_shape": list(SHAPE), "label_dim": 0, "label_dropout": 0.0}


def tiny(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    model = ar.build(config)
    with torch.no_grad():  # sharpen the untrained logits so sampling choices matter
        model.head.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def digits():
    images, labels, _ = _mnist_5k()
    small = F.adaptive_avg_pool2d(torch.from_numpy(images[:640]).float(), SHAPE[1:])
    return small.round().to(torch.uint8), torch.from_numpy(labels[:640])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: a second thread only adds sync cost, ~100x on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(model, settings, seeds, batch_size, labels=None):
    return generate(model, ar.FAMILY, settings, SHAPE, seeds, batch_size, labels=labels)


def test_tokens_round_trip():
    tokens = torch.randint(0, 5, (3, 2 * 4 * 3))
    images = ar.to_images(tokens, 5, (3, 2, 4))
    assert images.shape == (3, 3, 2, 4) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(ar.to_tokens(images, 5), tokens)
    assert ar.to_tokens(torch.tensor([-1.0, 1.0]).reshape(1, 2, 1, 1), 5).tolist() == [[0, 4]]  # channel innermost


def test_kv_cache_matches_teacher_forcing(model):
    tokens = torch.randint(0, 4, (3, 64))
    with torch.no_grad():
        full = model(tokens)
        caches = [tuple(torch.empty(3, 2, 64, 8) for _ in range(2)) for _ in model.blocks]
        x, steps = model.start(3, None), []
        for pos in range(64):
            steps.append(model.step(x, caches, pos))
            x = model.token_embed(tokens[:, pos:pos + 1])
    assert torch.allclose(full, torch.stack(steps, 1), atol=1e-5)


def test_loss_decreases_on_digits(digits):
    images, _ = digits
    torch.manual_seed(0)
    model = ar.build(CONFIG)
    loss_fn = ar.loss(CONFIG)
    batch = to_unit_range(images[:64])
    fixed_batch_loss = lambda m: loss_fn(m, batch).item()
    before = fixed_batch_loss(model)
    after = fixed_batch_loss(fit(model, loss_fn, images, None, steps=30, batch_size=32, lr=3e-3, seed=0))
    assert after < 0.8 * before and after < 0.65 * math.log(4)  # well below a uniform guess over 4 levels


def test_sampling_shape_range_and_per_seed(model):
    settings = ar.ARSettings()
    seeds = list(range(10, 22))
    together = gen(model, settings, seeds, 12)
    assert together.shape == (12, *SHAPE) and together.dtype == torch.uint8
    assert set(together.unique().tolist()) <= {0, 85, 170, 255}  # the 4 grey levels only
    assert len(together.unique()) > 1 and not torch.equal(together[0], together[1])
    apart = torch.cat([gen(model, settings, seeds[:1], 1), gen(model, settings, seeds[1:5], 4),
                       gen(model, settings, seeds[5:], 3)])
    # Float rounding of other batch sizes could move a u across a CDF edge; it does not here.
    assert torch.equal(together, apart)
    raw = ar.sample(model, PerSampleNoise([3, 4])((2, *SHAPE)), settings)
    assert raw.dtype == torch.float32 and raw.min() >= -1 and raw.max() <= 1


def test_top_k_one_is_greedy_decoding(model):
    out = ar.sample(model, torch.randn(2, *SHAPE), ar.ARSettings(top_k=1))
    assert torch.equal(out[0], out[1])  # latents no longer matter
    tokens = torch.zeros(1, 64, dtype=torch.long)
    with torch.no_grad():
        for pos in range(64):  # full re-run per position: no cache involved
            tokens[0, pos] = model(tokens)[0, pos].argmax()
    assert torch.equal(ar.to_tokens(out[:1], 4), tokens)


def test_settings_change_samples(model):
    seeds = list(range(8))
    base = gen(model, ar.ARSettings(), seeds, 8)
    assert not torch.equal(base, gen(model, ar.ARSettings(temperature=0.3), seeds, 8))
    assert not torch.equal(base, gen(model, ar.ARSettings(top_p=0.5), seeds, 8))


def test_nucleus_is_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.0625, 0.5, 0.25, 0.1875]], dtype=torch.float64)
    keep = lambda p: ar.nucleus(probs, p)[0].tolist()
    assert keep(0.3) == [False, True, False, False]
    assert keep(0.5) == [False, True, False, False]
    assert keep(0.75) == [False, True, True, False]
    assert keep(0.8) == [False, True, True, True]
    assert keep(1.0) == [True, True, True, True]


def test_inverse_cdf_edges_never_pick_a_filtered_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]], dtype=torch.float64).expand(5, 5)
    u = torch.tensor([0.0, 0.2, 0.25, 0.9, 1.0], dtype=torch.float64)
    assert ar.inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 3]


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"beam": 2}])
def test_settings_rejected(bad):
    with pytest.raises(ValidationError):
        ar.ARSettings(**bad)


def test_config_rejects_heads_not_dividing_dim():
    with pytest.raises(ValidationError):
        ar.ARConfig(dim=30, heads=4)


def test_conditional_model(digits):
    config = {**CONFIG, "label_dim": 3, "label_dropout": 0.1}
    model = tiny(config)
    assert model.start_embed.num_embeddings == 4  # 3 classes + "no label"
    with torch.no_grad():
        model.start_embed.weight.mul_(30)  # labels must reach the output
    images, labels = digits
    labels = labels[:8] % 3
    labels[0] = 3  # a dropped label
    assert torch.isfinite(ar.loss(config)(model, to_unit_range(images[:8]), labels))
    seeds = list(range(6))
    with_labels = gen(model, ar.ARSettings(), seeds, 6, class_labels(seeds, 3))
    without = gen(model, ar.ARSettings(), seeds, 6)
    assert with_labels.shape == without.shape == (6, *SHAPE)
    assert not torch.equal(with_labels, without)


def test_checkpoint_round_trip_and_merge(model, tmp_path, monkeypatch):
    monkeypatch.setattr(family, "BUILTIN", ())  # look up only what is registered (this module)
    path = tmp_path / "ar.safetensors"
    checkpoint.save(path, model.state_dict(), "ar", CONFIG)
    loaded, fam, config = checkpoint.load_model(path)
    assert fam is ar.FAMILY and config == CONFIG
    tokens = torch.randint(0, 4, (2, 64))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert torch.equal(gen(loaded, ar.ARSettings(), [1, 2], 2), gen(model, ar.ARSettings(), [1, 2], 2))

    other = tiny(seed=3).state_dict()
    merged = merge(model.state_dict(), other, 0.5)
    assert merged.keys() == other.keys()
    key = "head.weight"
    assert torch.allclose(merged[key], model.state_dict()[key] - 0.5 * (other[key] - model.state_dict()[key]))
    loaded.load_state_dict(merged)
    assert gen(loaded, ar.ARSettings(), [1, 2], 2).shape == (2, *SHAPE)
