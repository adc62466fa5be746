"""EDM diffusion (Karras et al. 2022): preconditioning, training loss and the Heun sampler.

The sampler is a plain function of (net, latents, settings), kept apart from training code.
"""
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from models import unet
from models.family import Family, Options, register
from models.guidance import guided
from models.unet import UNetConfig


class EDMPrecond(nn.Module):
    """Wraps a raw network F so that D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        f = self.net((c_in * x).to(torch.float32), c_noise, labels)
        return c_skip * x + c_out * f.to(torch.float32)


@dataclass(frozen=True)
class EDMLoss:
    p_mean: float = -1.2  # mean of log(sigma) during training
    p_std: float = 1.2  # std of log(sigma) during training
    sigma_data: float = 0.5  # std of the data, images in [-1, 1]

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        n = images.shape[0]
        rnd = torch.randn((n, 1, 1, 1), generator=generator, device=images.device)
        sigma = (rnd * self.p_std + self.p_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma
        denoised = model(images + noise, sigma, labels)
        return (weight * (denoised - images) ** 2).mean()


class EDMConfig(UNetConfig):
    sigma_data: Annotated[float, Field(gt=0)] = 0.5  # std of the training images in [-1, 1]


class HeunSettings(Options):
    num_steps: Annotated[int, Field(ge=2, le=1000)] = 10  # noise levels; 2*num_steps-1 network calls; fewer = more mode-seeking
    sigma_min: Annotated[float, Field(gt=0)] = 0.002  # lowest noise level
    sigma_max: Annotated[float, Field(gt=0)] = 80.0  # highest noise level (std of the initial latents)
    rho: Annotated[float, Field(gt=0)] = 7.0  # time-step exponent; higher spends more steps at low noise
    s_churn: Annotated[float, Field(ge=0)] = 0.0  # total stochasticity along the trajectory; 0 = deterministic ODE
    guidance: Annotated[float, Field(ge=0)] = 1.0  # classifier-free guidance scale (conditional models); > 1 is mode-seeking
    score_scale: Annotated[float, Field(gt=0)] = 1.0  # zeta: multiplies the ODE's score term; > 1 contracts to modes, < 1 spreads


def noise_levels(s: HeunSettings, device: torch.device) -> torch.Tensor:
    i = torch.arange(s.num_steps, dtype=torch.float64, device=device)
    inv_rho = 1 / s.rho
    t = (s.sigma_max ** inv_rho + i / max(s.num_steps - 1, 1) * (s.sigma_min ** inv_rho - s.sigma_max ** inv_rho)) ** s.rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def _denoise(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, guidance: float):
    sig = sigma.expand(x.shape[0]).to(torch.float32)
    return guided(model, x.to(torch.float32), sig, labels, guidance)


@torch.no_grad()
def heun_sample(model: nn.Module, latents: torch.Tensor, settings: HeunSettings,
                labels: torch.Tensor | None = None, churn_noise=None) -> torch.Tensor:
    """EDM Algorithm 2. `latents` are N(0, I); `churn_noise(shape)` draws per-sample noise when s_churn > 0."""
    t_steps = noise_levels(settings, latents.device)
    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = min(settings.s_churn / settings.num_steps, 2 ** 0.5 - 1) if settings.s_churn > 0 else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * churn_noise(x.shape).to(torch.float64)
        d_cur = settings.score_scale * (x - _denoise(model, x, t_hat, labels, settings.guidance)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if i < settings.num_steps - 1:
            d_prime = settings.score_scale * (x_next - _denoise(model, x_next, t_next, labels, settings.guidance)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x.to(torch.float32)


def build(config: dict) -> EDMPrecond:
    return EDMPrecond(unet.from_config(config), sigma_data=config.get("sigma_data", 0.5))


def loss(config: dict) -> EDMLoss:
    return EDMLoss(sigma_data=config.get("sigma_data", 0.5))


def sample(model: nn.Module, latents: torch.Tensor, settings: HeunSettings, labels=None, noise=None) -> torch.Tensor:
    return heun_sample(model, latents, settings, labels, churn_noise=noise)


FAMILY = register(Family(
    name="edm", summary="EDM diffusion, Heun ODE sampler; mode-seeking: few steps (num_steps ~10), guidance > 1",
    Config=EDMConfig, Settings=HeunSettings, build=build, loss=loss, sample=sample))
