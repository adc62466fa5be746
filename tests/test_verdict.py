"""What the evaluation concludes: precision/recall against every class of the real data, and a paired
t interval over seed runs that share their seeds (common random numbers)."""
from __future__ import annotations

import numpy as np
import pytest

from models import metrics
from stages import evaluate, report
from stages.reference import FeatureSpace


def test_precision_recall_compare_against_every_class_of_class_sorted_data():
    """The built-in MNIST is sorted by class: held-out real images scored as 'generated' must look real."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(10, 8))
    real = np.concatenate([c + rng.normal(size=(200, 8)) for c in centres])  # sorted by class, as the file is
    held_out = np.concatenate([c + rng.normal(size=(30, 8)) for c in centres])
    space = FeatureSpace("classifier", lambda x: x, real.mean(0), np.cov(real, rowvar=False), real)
    scored = evaluate.score(space, held_out, k=5, seed=1)
    assert scored["precision"] > 0.9 and scored["recall"] > 0.9
    assert evaluate.score(space, held_out, k=5, seed=1) == scored  # the same subset for every model


def test_real_subset_is_seeded_without_replacement():
    real = np.arange(100.0)[:, None]
    a, b = metrics.real_subset(real, 30, 3), metrics.real_subset(real, 30, 3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 30 and a.max() > 50
    assert metrics.real_subset(real, 500, 3) is real


def summary(base_runs, neon_runs):
    runs = {label: [{"classifier": {"fid": f, "kid": 0.0, "precision": 0.5, "recall": 0.5}} for f in fids]
            for label, fids in (("base", base_runs), ("neon", neon_runs))}
    return evaluate.summarise(runs, {"classifier": 300})["classifier"]


def test_consistent_paired_gain_is_significant_although_the_seed_spread_is_large():
    s = summary([10.0, 12.0, 14.0], [9.0, 11.0, 13.0])  # every shared seed gains exactly 1
    assert s["gain"]["mean"] == pytest.approx(1.0) and s["gain"]["interval"] == pytest.approx([1.0, 1.0])
    assert s["improved"] and s["gain"]["verdict"] == "improved"


def test_uneven_gain_over_three_runs_is_inconclusive_with_two_degrees_of_freedom():
    """Differences 2.5, 2.5, 5.5: mean 3.5, sd 1.732, t(0.975, 2) = 4.303, so the interval is 3.5 +- 4.303."""
    s = summary([10.0, 11.0, 12.0], [7.5, 8.5, 6.5])
    g = s["gain"]
    assert (g["runs"], g["df"]) == (3, 2)
    assert g["interval"] == pytest.approx([3.5 - 4.3027, 3.5 + 4.3027], abs=1e-3)
    assert not s["improved"] and g["verdict"] == "inconclusive"
    assert g["runs_needed"] == 4  # t(0.975, 3) * 1.732 / 2 = 2.76 < 3.5
    line = report.verdict("classifier", s)
    assert "no conclusion" in line and "too few seed runs" in line and "about 4" in line


def test_a_consistent_loss_is_called_worse():
    s = summary([10.0, 11.0, 12.0], [11.0, 12.1, 12.9])
    assert s["gain"]["verdict"] == "worse" and "worse" in report.verdict("classifier", s)


def test_identical_models_are_inconclusive_not_improved():
    s = summary([10.0, 11.0], [10.0, 11.0])
    assert s["gain"]["verdict"] == "inconclusive" and s["gain"]["runs_needed"] is None
