"""Known answers for the edm, flow and consistency samplers.

Data x0 ~ N(m, S^2) per coordinate has a closed-form denoiser, velocity and consistency function, so
the exact "network" is a formula and each sampler's output (or its convergence order) is known.
A conditional model shifts the mean with the label; guidance then extrapolates the mean linearly,
because the conditional and unconditional fields differ only in it (same S).
"""
import math

import pytest
import torch
from torch import nn

from models import consistency, edm, flow
from models.edm import HeunSettings
from models.flow import FlowSettings

M, S, SHIFT = 0.3, 0.6, 0.5  # m != 0 and S != 1, so no term of the answers vanishes by accident
Z = torch.randn(32, 1, 2, 2, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(32) % 4


def data_mean(labels):
    return M if labels is None else M + SHIFT * labels.reshape(-1, 1, 1, 1).double()


def order(err_n, err_2n):
    return math.log2(err_n / err_2n)


class ExactDenoiser(nn.Module):
    """D(x; sigma) = E[x0 | x0 + sigma n = x] = m + S^2 / (S^2 + sigma^2) (x - m)."""

    def forward(self, x, sigma, labels=None):
        m, sig2 = data_mean(labels), sigma.reshape(-1, 1, 1, 1).double() ** 2
        return (m + S ** 2 / (S ** 2 + sig2) * (x.double() - m)).float()


class ExactVelocity(nn.Module):
    """v(x, t) = E[eps - x0 | (1 - t) x0 + t eps = x]: x_t has mean (1 - t) m, variance V = (1 - t)^2 S^2 + t^2,
    and covariance t with eps, (1 - t) S^2 with x0."""

    def forward(self, x, t, labels=None):
        m, t = data_mean(labels), t.reshape(-1, 1, 1, 1).double()
        var = (1 - t) ** 2 * S ** 2 + t ** 2
        return (-m + (t - (1 - t) * S ** 2) / var * (x.double() - (1 - t) * m)).float()


class ExactConsistency(nn.Module):
    """f(x, sigma): where the probability-flow ODE through x at sigma arrives at sigma_min (edm_ode below)."""
    sigma_min, sigma_max = 0.002, 80.0

    def forward(self, x, sigma, labels=None):
        return edm_ode(x.double(), sigma.reshape(-1, 1, 1, 1).double(), self.sigma_min, data_mean(labels)).float()


@pytest.fixture
def denoiser():
    return ExactDenoiser()


@pytest.fixture
def velocity():
    return ExactVelocity()


@pytest.fixture
def consistency_fn():
    return ExactConsistency()


def edm_ode(x, sigma_from, sigma_to, m=M, zeta=1.0):
    """dx/dsigma = zeta (x - D) / sigma = zeta sigma / (S^2 + sigma^2) (x - m), so x - m scales as
    (S^2 + sigma^2)^(zeta / 2): zeta > 1 shrinks the spread below S, zeta < 1 widens it."""
    return m + (x - m) * ((S ** 2 + sigma_to ** 2) / (S ** 2 + sigma_from ** 2)) ** (zeta / 2)


def edm_answer(m=M, zeta=1.0, sigma_min=0.002):
    """Heun's limit: the ODE from sigma_max = 80 down to sigma_min, then EDM's final Euler step to sigma = 0.
    That step's factor differs from the ODE's by ~ sigma_min^2 / S^2 = 1e-5, as much as Heun's error at 512 steps."""
    x = edm_ode(80.0 * Z.double(), 80.0, sigma_min, m, zeta)
    return x - zeta * sigma_min ** 2 / (S ** 2 + sigma_min ** 2) * (x - m)


def heun(model, num_steps, labels=None, **settings):
    return edm.heun_sample(model, Z, HeunSettings(num_steps=num_steps, **settings), labels).double()


def test_edm_noise_levels_are_uniform_in_sigma_to_the_one_over_rho():
    t = edm.noise_levels(HeunSettings(num_steps=6, sigma_min=0.01, sigma_max=50.0, rho=3.0), torch.device("cpu"))
    assert len(t) == 7 and t[-1] == 0  # num_steps levels, then the final jump to the data
    assert t[0].item() == pytest.approx(50.0) and t[-2].item() == pytest.approx(0.01)
    gaps = t[:-1].pow(1 / 3).diff()
    assert torch.allclose(gaps, gaps[0].expand(5))


@pytest.mark.parametrize("zeta", [0.8, 1.0, 1.3])
def test_edm_heun_solves_the_probability_flow_ode_at_second_order(denoiser, zeta):
    # 256 -> 512 intervals halves every step of the rho grid
    err = [(heun(denoiser, n, score_scale=zeta) - edm_answer(zeta=zeta)).abs().max().item() for n in (257, 513)]
    assert err[1] < 1e-3  # ~1e-4 here; outputs are O(1), and 5 steps are off by O(1)
    assert 1.5 < order(*err) < 2.5  # Euler would give 1


@pytest.mark.parametrize("g", [0.0, 1.0, 2.5])
def test_edm_guidance_extrapolates_the_data_mean(denoiser, g):
    m_g = M + g * (data_mean(LABELS) - M)
    out = heun(denoiser, 513, LABELS, guidance=g)
    assert (out - edm_answer(m_g)).abs().max() < 1e-3


@pytest.mark.parametrize("g, alone", [(1.0, LABELS), (0.0, None)])
def test_edm_guidance_1_is_the_conditional_model_and_0_the_unconditional_bit_for_bit(denoiser, g, alone):
    class Fixed(nn.Module):  # the same exact model, always asked with `alone`
        def forward(self, x, sigma, labels=None):
            return denoiser(x, sigma, alone)

    assert torch.equal(heun(denoiser, 10, LABELS, guidance=g), heun(Fixed(), 10))


def run_flow(model, method, num_steps, labels=None, guidance=1.0):
    settings = FlowSettings(method=method, num_steps=num_steps, guidance=guidance)
    return flow.flow_sample(model, Z, settings, labels).double()


def test_flow_one_euler_step_from_noise_lands_on_the_data_mean(velocity):
    # x_1 = eps carries no information on x0, so v(x, 1) = x - E[x0] and one step back lands on m.
    assert (run_flow(velocity, "euler", 1) - M).abs().max() < 1e-6


@pytest.mark.parametrize("method, expected_order", [("euler", 1), ("heun", 2), ("midpoint", 3)])
def test_flow_solvers_transport_noise_to_data_at_their_order(velocity, method, expected_order):
    """x(t) = (1 - t) m + sqrt(V(t)) eps solves dx/dt = v, so t = 0 gives m + S eps for every eps.

    Midpoint is third order here: sqrt(V) solves y' = a y with a = V'/2V, and as V is quadratic
    a' = c/V - 2a^2 (c = V''/2), so midpoint's local error density a''/24 + a a'/4 + a^3/6 is identically 0.
    Heun's, a^3/6 - a''/12 = -(c/V - a^2)'/8, integrates to (1/S^2 - S^2)/8 in size: second order as S != 1.
    """
    exact = M + S * Z.double()
    err = [(run_flow(velocity, method, n) - exact).abs().max().item() for n in (16, 32)]
    assert err[1] < 0.1  # Euler's 32-step error is ~0.04 here; the others are far below
    assert abs(order(*err) - expected_order) < 0.5


@pytest.mark.parametrize("g", [0.0, 1.0, 2.5])
def test_flow_guidance_extrapolates_the_data_mean(velocity, g):
    m_g = M + g * (data_mean(LABELS) - M)
    out = run_flow(velocity, "midpoint", 32, LABELS, g)
    assert (out - (m_g + S * Z.double())).abs().max() < 1e-4


@pytest.mark.parametrize("num_steps, levels", [(1, []), (2, [0.5]), (3, [2.0, 0.5])])
def test_consistency_sampler_with_the_exact_consistency_function(consistency_fn, num_steps, levels):
    """The first jump is the ODE from sigma_max to sigma_min, exactly; each re-noise level then adds
    fresh noise of variance level^2 - sigma_min^2 and jumps back along the ODE from that level."""
    draws = []

    def noise(shape):
        draws.append(torch.randn(shape, generator=torch.Generator().manual_seed(len(draws) + 1)))
        return draws[-1]

    settings = consistency.MultistepSettings(num_steps=num_steps, sigma_high=2.0, sigma_low=0.5)
    out = consistency.sample(consistency_fn, Z, settings, noise=noise)
    expected = edm_ode(80.0 * Z.double(), 80.0, 0.002)
    assert len(draws) == len(levels)
    for level, w in zip(levels, draws):
        expected = edm_ode(expected + math.sqrt(level ** 2 - 0.002 ** 2) * w.double(), level, 0.002)
    assert (out.double() - expected).abs().max() < 1e-6  # float32 rounding: the sampler adds no error of its own


@pytest.mark.parametrize("g", [1.0, 2.5])
def test_network_calls_are_the_documented_cost(denoiser, velocity, g):
    """HeunSettings: 2 num_steps - 1 evaluations; FlowSettings: 1/2/2 per step for euler/midpoint/heun;
    guided(): one call per evaluation when guidance is 1 (the unconditional one would change nothing)."""
    calls, per_eval = [], 1 if g == 1.0 else 2
    for model in (denoiser, velocity):
        model.register_forward_pre_hook(lambda *_: calls.append(1))
    heun(denoiser, 10, LABELS, guidance=g)
    assert len(calls) == 19 * per_eval
    for method, per_step in [("euler", 1), ("midpoint", 2), ("heun", 2)]:
        calls.clear()
        run_flow(velocity, method, 10, LABELS, g)
        assert len(calls) == 10 * per_step * per_eval, method
