"""The paper's 2D toy (NEON.md) end to end, seeded: the sign of the best w follows the sampler.

Mode-seeking samplers (zeta > 1, temperature < 1) want w > 0 (Neon); diversity-seeking ones
(zeta < 1, temperature > 1) want w < 0 (plain self-training). FID is in closed form.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

from models import family as families
from models import toy, toy_check

DIFFUSION_W = [round(-2 + 0.25 * i, 2) for i in range(17)]
AR_W = [round(-1 + 0.1 * i, 1) for i in range(21)]


def _run(family, sampler, weights):
    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    recipe = replace(toy_check.RECIPES[family], eval_n=20_000)
    result = toy_check.run(family, sampler, weights, seed=0, recipe=recipe)
    print(f"{family} {sampler}: best w {result['best_w']:+g}, FID {result['base_fid']:.4f} -> {result['best_fid']:.4f}, "
          f"P-weighted gradient cosine {result['alignment']:+.3f}, real risk at best w {result['risk_change_at_best']:+.2%}")
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


def test_autoregressive_gradient_cosine_has_the_sign_of_the_real_risk_slope(autoregressive):
    """The cosine stands for the real risk's first-order change along the merge; at the best w that risk fell."""
    for r in autoregressive.values():
        assert (r["alignment"] > 0) == (r["risk_slope"] > 0)
        assert r["risk_change_at_best"] < 0


def test_diffusion_fid_gain_comes_with_a_higher_real_risk(diffusion):
    """Measured, not the theory's premise: the denoising loss on real data is lowest near w = 0, so the
    diffusion toy's FID gain is not a lower training risk (the notebook sampler's narrowing is undone)."""
    for r in diffusion.values():
        assert r["best_w"] != 0 and r["risk_change_at_best"] > 0


def _time_inputs(mode, steps=20, timesteps=1000):
    """The time inputs the network sees in training (every t, in order) and at each sampler step i."""
    fam = families.get("toy_diffusion")
    config = {**fam.Config().model_dump(), "image_shape": [2], "label_dim": 0, "timesteps": timesteps, "time_input": mode}
    model, seen = fam.build(config), []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[1].double().flatten()))
    fam.loss(config)(model, torch.zeros(20 * timesteps, 2), None, torch.Generator().manual_seed(0))
    train = seen.pop().unique()  # sorted, one per t when every t was drawn
    assert len(train) == timesteps
    fam.sample(model, torch.zeros(3, 2), fam.Settings(num_steps=steps), None, None)
    by_step = {steps - 1 - j: u[0].item() for j, u in enumerate(seen)}  # the sampler steps from i = steps-1 down
    return train, by_step


def test_diffusion_consistent_time_input_tells_the_noise_the_sampler_steps_on():
    """Through the training map (input -> abar of that t), each sampler step's input means its own abar."""
    train, by_step = _time_inputs("consistent")
    told = np.interp([by_step[i] for i in range(20)], train.numpy(), toy.cosine_abar(1000).numpy())
    np.testing.assert_allclose(told, toy.cosine_abar(20).numpy(), rtol=1e-4, atol=1e-7)


def test_diffusion_notebook_time_input_is_the_papers():
    """The paper's notebook, kept as the reference: t/(T-1) in training, i/(k-1) in sampling, so the
    sampler tells the network more noise (smaller abar) than the step it takes."""
    train, by_step = _time_inputs("notebook")
    assert torch.equal(train, (torch.arange(1000) / 999).double())
    assert [by_step[i] for i in range(20)] == [torch.tensor(i / 19).item() for i in range(20)]
    told = np.interp([by_step[i] for i in range(20)], train.numpy(), toy.cosine_abar(1000).numpy())
    assert (told[1:] < toy.cosine_abar(20).numpy()[1:]).all()


def test_diffusion_time_input_defaults_to_the_notebook():
    """Default params and checkpoints saved before the option existed both mean the paper's setup."""
    assert toy.ToyDiffusionConfig().time_input == "notebook"
    old_config = {"timesteps": 1000, "width": 32, "depth": 4, "image_shape": [2], "label_dim": 0}
    assert families.get("toy_diffusion").build(old_config).time_input == "notebook"
