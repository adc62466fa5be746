"""models/sampling.py (per-sample seeds), EDMLoss and models/training.fit on a tiny EDM model."""
import math

import numpy as np
import pytest
import torch

from models import edm, family
from models.edm import EDMLoss, HeunSettings
from models.sampling import PerSampleNoise, PhiloxNormal, generate, philox4x32
from models.training import fit

CONFIG = {"channels": [8, 16], "emb_dim": 16, "image_shape": [1, 28, 28], "sigma_data": 0.5, "dropout": 0.0}
SHAPE = (1, 28, 28)
SETTINGS = HeunSettings(num_steps=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = edm.build(CONFIG)
    with torch.no_grad():  # conv_out starts at zero, which would make every image a scaled latent
        m.net.conv_out.weight.add_(torch.randn_like(m.net.conv_out.weight) * 0.1)
    return m.eval()


def gen(model, seeds, batch_size):
    return generate(model, family.get("edm"), SETTINGS, SHAPE, seeds, batch_size)


def test_output_type_and_shape(model):
    out = gen(model, [1, 2, 3], 2)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 28, 28)
    assert out.float().std() > 0


def test_latents_depend_only_on_seed():
    together = PerSampleNoise([10, 11, 12])((3, *SHAPE))
    apart = torch.cat([PerSampleNoise([s])((1, *SHAPE)) for s in (10, 11, 12)])
    assert torch.equal(together, apart)


def test_batch_size_changes_images_at_most_by_rounding(model):
    seeds = list(range(10, 18))
    ref = gen(model, seeds, 8).int()
    assert not torch.equal(ref[0], ref[1])
    others = [gen(model, seeds, bs).int() for bs in (2, 3)]
    others.append(torch.cat([gen(model, [s], 1) for s in seeds]).int())
    for out in others:
        diff = (out - ref).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_same_batch_boundaries_give_bit_identical_images_for_any_sharding(model):
    """What stages/sample.py promises: shards made of whole batches reproduce the set bit for bit."""
    seeds = list(range(10, 26))
    whole = gen(model, seeds, 4)
    sharded = torch.cat([gen(model, seeds[a:a + 8], 4) for a in (0, 8)])
    assert torch.equal(sharded, whole)


def test_progress_reported(model):
    calls = []
    generate(model, family.get("edm"), SETTINGS, SHAPE, [0, 1, 2], 2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 3), (3, 3)]


def test_edm_loss_finite_scalar(model):
    images = torch.rand(4, *SHAPE) * 2 - 1
    loss = EDMLoss()(model, images, None, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and math.isfinite(loss.item()) and loss.item() > 0


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_fit_runs(ema_decay):
    torch.manual_seed(0)
    net = edm.build(CONFIG)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randint(0, 256, (16, *SHAPE), dtype=torch.uint8)
    out = fit(net, edm.loss(CONFIG), images, None, steps=3, batch_size=4, lr=1e-3, seed=0, ema_decay=ema_decay)
    assert isinstance(out, type(net)) and not out.training
    assert (out is net) == (ema_decay == 0)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # it trained


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of N(0, s^2 I) data: D(x; sigma) = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, s: float):
        super().__init__()
        self.s2 = s * s

    def forward(self, x, sigma, labels=None):
        return x * self.s2 / (self.s2 + sigma.view(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("zeta, spread", [(0.9, "wider"), (1.0, "exact"), (1.1, "narrower")])
def test_score_scale_spreads_or_contracts_the_samples(zeta, spread):
    """zeta = 1 solves the model's ODE (samples keep the data's std); < 1 is diversity-seeking, > 1 mode-seeking."""
    latents = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    std = edm.heun_sample(GaussianDenoiser(0.5), latents, HeunSettings(num_steps=40, score_scale=zeta)).std().item()
    assert {"wider": std > 0.55, "exact": abs(std - 0.5) < 0.02, "narrower": std < 0.45}[spread], std


# ---- Philox noise: what CUDA draws, run here on the CPU ----

@pytest.mark.parametrize("counter, key, expected", [  # Random123's known-answer vectors for philox4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key))
    assert tuple(int(v) for v in out) == expected


def philox(seeds, *shape):
    return PerSampleNoise(seeds, "cpu", "philox")((len(seeds), *shape))


def test_philox_noise_is_per_seed_and_independent_of_the_batch():
    seeds = [10, 11, 12, 2 ** 40 + 5, -3]
    together = philox(seeds, *SHAPE)
    assert together.dtype == torch.float32 and together.shape == (5, *SHAPE)
    assert torch.equal(together, philox(seeds, *SHAPE))  # the same seeds, the same noise
    apart = torch.cat([philox([s], *SHAPE) for s in seeds])
    assert torch.equal(together, apart)
    order = [3, 0, 4, 1, 2]
    assert torch.equal(philox([seeds[i] for i in order], *SHAPE), together[order])
    mixed = philox([99, 12, 98, 10], *SHAPE)  # other neighbours, other positions
    assert torch.equal(mixed[1], together[2]) and torch.equal(mixed[3], together[0])
    assert not torch.equal(together[0], together[1])


def test_philox_streams_continue_across_calls_like_a_generator():
    """A sampler's later draws (churn, re-noising) continue the sample's stream: they depend on what the
    sample drew before, not on its batch, and never repeat an earlier draw."""
    a, b = PerSampleNoise([7, 8], "cpu", "philox"), PerSampleNoise([8], "cpu", "philox")
    first_a, first_b = a((2, *SHAPE)), b((1, *SHAPE))
    second_a, second_b = a((2, 3)), b((1, 3))
    assert torch.equal(first_a[1], first_b[0]) and torch.equal(second_a[1], second_b[0])
    one = PhiloxNormal([8])
    whole = one((4 * 196 + 3,))  # 196 blocks of four normals, then three of a 197th block
    again = PhiloxNormal([8])
    assert torch.equal(again((4 * 196,)), whole[:, :4 * 196])
    assert not torch.isin(second_a, first_a).any()


def test_philox_noise_is_standard_normal():
    from scipy import stats

    z = philox(list(range(200)), 1000).double()  # 200,000 draws, fixed seeds
    flat = z.flatten().numpy()
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01  # 5 standard errors: 0.011, 0.008
    assert abs(stats.skew(flat)) < 0.03 and abs(stats.kurtosis(flat)) < 0.06
    assert stats.normaltest(flat).pvalue > 0.01
    big = philox(list(range(1000, 3000)), 1000).flatten().double().numpy()  # 2,000,000 draws
    assert stats.kstest(big, "norm").pvalue > 1e-3
    bins = np.bincount(np.minimum((stats.norm.cdf(big) * 1000).astype(int), 999), minlength=1000)
    assert stats.chisquare(bins).pvalue > 1e-3  # 1000 equiprobable bins
    corr = torch.corrcoef(z)  # samples are uncorrelated with one another: r ~ N(0, 1/1000) off the diagonal
    off = corr[~torch.eye(200, dtype=torch.bool)]
    assert abs(off.mean()) < 0.002 and abs(off.std() * 1000 ** 0.5 - 1) < 0.05 and off.abs().max() < 0.2  # 0.14
    lag = np.corrcoef(flat[:-1], flat[1:])[0, 1]  # and neighbours within a sample (Box-Muller pairs)
    assert abs(lag) < 0.01


def test_noise_shape_must_match_the_seeds():
    for method in ("generators", "philox"):
        with pytest.raises(ValueError, match="3 samples asked of 2"):
            PerSampleNoise([1, 2], "cpu", method)((3, 4))
    with pytest.raises(ValueError, match="unknown noise method"):
        PerSampleNoise([1], "cpu", "cuda")


def test_auto_noise_is_cpu_generators_on_the_cpu():
    auto = PerSampleNoise([10, 11], "cpu")
    assert auto.method == "generators"
    expected = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (10, 11)])
    assert torch.equal(auto((2, *SHAPE)), expected)


def test_generate_with_philox_noise_keeps_the_per_seed_promises(model):
    seeds = list(range(10, 18))
    run = lambda s, bs: generate(model, family.get("edm"), SETTINGS, SHAPE, s, bs, noise_method="philox")
    ref = run(seeds, 8)
    assert torch.equal(torch.cat([run(seeds[:4], 4), run(seeds[4:], 4)]), run(seeds, 4))  # whole batches: bit for bit
    for out in (run(seeds, 3).int(), torch.cat([run([s], 1) for s in seeds]).int()):
        diff = (out - ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert not torch.equal(ref, gen(model, seeds, 8))  # other noise than the CPU generators'
