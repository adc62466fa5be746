"""The paper's 2D toy generators (NEON.md), on points instead of images.

- `toy_diffusion`: an epsilon-predicting MLP trained on a cosine schedule; its deterministic sampler
  scales the score by `zeta` in the x0 prediction only (zeta > 1 mode-seeking, < 1 diversity-seeking).
- `toy_ar`: p(x1) p(x2 | x1), both Gaussian, trained by likelihood; temperature `tau` multiplies both
  stds when sampling (tau < 1 mode-seeking, > 1 diversity-seeking).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from models.family import Family, Options, register

LOG_STD_RANGE = (-6.0, 3.0)  # the AR toy's clamp on predicted log-stds


def cosine_abar(steps: int, s: float = 0.008) -> torch.Tensor:
    """abar_t = f(t) / f(0) for t = 0..steps-1, f(t) = cos^2(((t/steps + s) / (1 + s)) pi/2), in float64.

    t = steps (where f = 0 and x0 cannot be recovered) is never used.
    """
    t = torch.arange(steps, dtype=torch.float64)
    f = torch.cos(((t / steps + s) / (1 + s)) * math.pi / 2) ** 2
    return f / f[0]


TimeInput = Literal["notebook", "consistent"]


def time_input(mode: str, step: int | torch.Tensor, steps: int):
    """The network's time input at `step` of a `steps`-step cosine schedule (noise level f(step/steps)).

    notebook (the paper's): step/(steps-1), so one input means f(u (T-1)/T) in training but f(u (k-1)/k)
    in a k-step sampler: the sampler tells the network more noise than there is. consistent: step/steps,
    noise f(u) in both.
    """
    return step / (steps - 1) if mode == "notebook" else step / steps


class ToyDiffusionConfig(Options):
    timesteps: Annotated[int, Field(ge=2)] = 1000  # T of the training schedule
    width: Annotated[int, Field(gt=0)] = 32  # hidden width of the MLP
    depth: Annotated[int, Field(ge=1)] = 4  # hidden Linear+ReLU layers
    time_input: TimeInput = "notebook"  # the MLP's time input u: notebook = the paper's (t/(T-1), i/(k-1)); consistent = noise f(u) in training and sampling (t/T, i/k)


class ToyDiffusionSettings(Options):
    num_steps: Annotated[int, Field(ge=2, le=1000)] = 20  # steps of the sampler's own cosine schedule
    zeta: Annotated[float, Field(gt=0)] = 1.1  # score scale in the x0 prediction; > 1 mode-seeking, < 1 diversity-seeking
    eta: Annotated[float, Field(ge=0, le=1)] = 0.0  # DDIM stochasticity: 0 deterministic, 1 ancestral


class EpsilonMLP(nn.Module):
    """[x, u] -> Linear -> depth x (Linear + ReLU) -> Linear -> predicted noise; u from `time_input`."""

    def __init__(self, dim: int, width: int, depth: int, time_input: TimeInput = "notebook"):
        super().__init__()
        self.time_input = time_input  # on the network, so its loss and its sampler read one convention
        layers: list[nn.Module] = [nn.Linear(dim + 1, width)]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        return self.net(torch.cat([x.to(torch.float32), t.reshape(-1, 1).to(torch.float32)], dim=1))


@dataclass(frozen=True)
class EpsilonLoss:
    timesteps: int

    def __call__(self, model, x0, labels, generator=None) -> torch.Tensor:
        abar = cosine_abar(self.timesteps).to(x0.device, torch.float32)
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        a = abar[t].reshape(-1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return ((model(x_t, time_input(model.time_input, t, self.timesteps)) - eps) ** 2).mean()


@torch.no_grad()
def toy_diffusion_sample(model: nn.Module, latents: torch.Tensor, settings: ToyDiffusionSettings,
                         labels=None, noise=None) -> torch.Tensor:
    """DDIM steps on a num_steps cosine schedule; zeta scales eps only inside x0; `noise` when eta > 0."""
    k = settings.num_steps
    abar = cosine_abar(k)
    x = latents.to(torch.float64)
    x0 = x
    for i in reversed(range(k)):
        eps = model(x, torch.full((x.shape[0],), time_input(model.time_input, i, k))).to(torch.float64)
        a, a_prev = abar[i], (abar[i - 1] if i else torch.tensor(1.0, dtype=torch.float64))
        x0 = (x - (1 - a).sqrt() * settings.zeta * eps) / a.sqrt()
        sigma = settings.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if settings.eta > 0 and i > 0:
            x = x + sigma * noise(x.shape).to(torch.float64)
    return x0.to(torch.float32)


class ToyARConfig(Options):
    hidden: Annotated[int, Field(gt=0)] = 64  # width of the MLP that gives (mu2, log_std2) from x1


class ToyARSettings(Options):
    tau: Annotated[float, Field(gt=0)] = 0.5  # temperature on both stds; < 1 mode-seeking, > 1 diversity-seeking


class TwoFactorGaussian(nn.Module):
    """p(x1) = N(mu1, std1^2) with free parameters; p(x2 | x1) = N(mu2(x1), std2(x1)^2) from an MLP."""

    def __init__(self, hidden: int):
        super().__init__()
        self.first = nn.Parameter(torch.zeros(2))  # (mu1, log_std1)
        self.cond = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 2))

    def factors(self, x1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu1, log_std1 = self.first[0], self.first[1].clamp(*LOG_STD_RANGE)
        mu2, log_std2 = self.cond(x1.reshape(-1, 1).to(torch.float32)).unbind(1)
        return mu1, log_std1, mu2, log_std2.clamp(*LOG_STD_RANGE)


def toy_ar_nll(model: TwoFactorGaussian, x: torch.Tensor, labels=None, generator=None) -> torch.Tensor:
    mu1, ls1, mu2, ls2 = model.factors(x[:, 0])
    nll = ls1 + 0.5 * ((x[:, 0] - mu1) / ls1.exp()) ** 2 + ls2 + 0.5 * ((x[:, 1] - mu2) / ls2.exp()) ** 2
    return nll.mean() + math.log(2 * math.pi)


@torch.no_grad()
def toy_ar_sample(model: TwoFactorGaussian, latents: torch.Tensor, settings: ToyARSettings,
                  labels=None, noise=None) -> torch.Tensor:
    mu1, ls1, _, _ = model.factors(torch.zeros(1))
    x1 = mu1 + settings.tau * ls1.exp() * latents[:, 0]
    _, _, mu2, ls2 = model.factors(x1)
    return torch.stack([x1, mu2 + settings.tau * ls2.exp() * latents[:, 1]], dim=1)


def _build_diffusion(config: dict) -> EpsilonMLP:
    # checkpoints saved before the option existed were trained the notebook's way
    return EpsilonMLP(config["image_shape"][0], config["width"], config["depth"], config.get("time_input", "notebook"))


FAMILY_DIFFUSION = register(Family(
    name="toy_diffusion", summary="2D toy: epsilon-MLP diffusion; mode-seeking: zeta > 1 (diversity-seeking: zeta < 1)",
    Config=ToyDiffusionConfig, Settings=ToyDiffusionSettings, build=_build_diffusion,
    loss=lambda config: EpsilonLoss(config["timesteps"]), sample=toy_diffusion_sample, data_kind="vector"))
FAMILY_AR = register(Family(
    name="toy_ar", summary="2D toy: two-factor Gaussian autoregressive model; mode-seeking: tau < 1 (diversity: tau > 1)",
    Config=ToyARConfig, Settings=ToyARSettings, build=lambda config: TwoFactorGaussian(config["hidden"]),
    loss=lambda config: toy_ar_nll, sample=toy_ar_sample, data_kind="vector"))
