"""The paper's 2D toy (NEON.md) end to end, seeded: the sign of the best w follows the sampler.

Mode-seeking samplers (zeta > 1, temperature < 1) want w > 0 (Neon); diversity-seeking ones
(zeta < 1, temperature > 1) want w < 0 (plain self-training). FID is in closed form.
"""
from dataclasses import replace

import pytest
import torch

from models import toy_check

DIFFUSION_W = [round(-2 + 0.25 * i, 2) for i in range(17)]
AR_W = [round(-1 + 0.1 * i, 1) for i in range(21)]


def _run(family, sampler, weights):
    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    recipe = replace(toy_check.RECIPES[family], eval_n=20_000)
    result = toy_check.run(family, sampler, weights, seed=0, recipe=recipe)
    print(f"{family} {sampler}: best w {result['best_w']:+g}, FID {result['base_fid']:.4f} -> {result['best_fid']:.4f}, "
          f"P-weighted gradient cosine {result['alignment']:+.3f}")
    return result


@pytest.fixture(scope="module")
def diffusion():
    return {z: _run("toy_diffusion", {"zeta": z}, DIFFUSION_W) for z in (1.1, 0.9)}


@pytest.fixture(scope="module")
def autoregressive():
    return {t: _run("toy_ar", {"tau": t}, AR_W) for t in (0.5, 1.6)}


def test_diffusion_mode_seeking_zeta_wants_extrapolation(diffusion):
    r = diffusion[1.1]
    assert r["best_w"] > 0
    assert r["best_fid"] <= 0.5 * r["base_fid"]


def test_diffusion_diversity_seeking_zeta_wants_self_training(diffusion):
    assert diffusion[0.9]["best_w"] < 0
    assert diffusion[0.9]["best_fid"] < diffusion[0.9]["base_fid"]


def test_autoregressive_low_temperature_wants_extrapolation(autoregressive):
    assert autoregressive[0.5]["best_w"] > 0
    assert autoregressive[0.5]["best_fid"] < autoregressive[0.5]["base_fid"]


def test_autoregressive_high_temperature_wants_self_training(autoregressive):
    assert autoregressive[1.6]["best_w"] < 0


def test_autoregressive_gradient_alignment_sign_follows_the_sampler(autoregressive):
    """<g_real, P g_synthetic> < 0 for the mode-seeking sampler, > 0 for the diversity-seeking one."""
    assert autoregressive[0.5]["alignment"] < 0 < autoregressive[1.6]["alignment"]

