"""Consistency models trained by consistency training (Song et al. 2023), with the improvements of
Song & Dhariwal 2023 (iCT): the target is the network itself under stop-gradient (no EMA teacher),
a pseudo-Huber distance, lognormal sampling of noise-level indices and weighting 1/(sigma_{i+1}-sigma_i).

Training needs no teacher, so the same loss serves base training and self-training.
"""
import math
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field, model_validator
from torch import nn

from models import unet
from models.family import Family, Options, register
from models.guidance import guided
from models.unet import UNetConfig


class ConsistencyConfig(UNetConfig):
    sigma_data: Annotated[float, Field(gt=0)] = 0.5  # std of the training images in [-1, 1]
    sigma_min: Annotated[float, Field(gt=0)] = 0.002  # noise level where f is the identity (boundary condition)
    sigma_max: Annotated[float, Field(gt=0)] = 80.0  # highest noise level; one-step sampling starts here
    rho: Annotated[float, Field(gt=0)] = 7.0  # Karras exponent of the training discretisation
    num_scales: Annotated[int, Field(ge=2, le=2000)] = 80  # N levels of that discretisation (fixed, no curriculum)
    huber_c: Annotated[float, Field(gt=0)] | None = None  # pseudo-Huber constant; None = iCT's 0.00054 * sqrt(C*H*W)
    p_mean: float = -1.1  # mean of log(sigma) for the lognormal choice of the training level
    p_std: Annotated[float, Field(gt=0)] = 2.0  # std of log(sigma) for that choice


def _config(config: dict) -> ConsistencyConfig:
    return ConsistencyConfig(**{k: v for k, v in config.items() if k in ConsistencyConfig.model_fields})


class ConsistencyPrecond(nn.Module):
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise), with c_skip = 1 and c_out = 0 at sigma_min."""

    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float, sigma_max: float):
        super().__init__()
        self.net, self.sigma_data, self.sigma_min, self.sigma_max = net, sigma_data, sigma_min, sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        sd2, above_min = self.sigma_data ** 2, sigma - self.sigma_min
        c_skip = sd2 / (above_min ** 2 + sd2)
        c_out = self.sigma_data * above_min / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        f = self.net((c_in * x).to(torch.float32), sigma.log().flatten() / 4, labels)
        return c_skip * x + c_out * f.to(torch.float32)


def karras_levels(sigma_min: float, sigma_max: float, rho: float, n: int) -> torch.Tensor:
    """n levels from sigma_min up to sigma_max, denser at low noise as rho grows (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


@dataclass(frozen=True)
class ConsistencyLoss:
    levels: torch.Tensor  # the training discretisation sigma_0 < ... < sigma_{N-1}
    level_probs: torch.Tensor  # probability of training on the pair (sigma_i, sigma_{i+1})
    huber_c: float

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        dev, shape = images.device, (-1, 1, 1, 1)
        i = torch.multinomial(self.level_probs.to(dev), images.shape[0], replacement=True, generator=generator)
        low, high = self.levels.to(dev)[i].float(), self.levels.to(dev)[i + 1].float()
        z = torch.randn(images.shape, generator=generator, device=dev)  # one noise for both ends of the pair
        # Same RNG state for both passes, so dropout masks match between student and target.
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
            target = model(images + low.view(shape) * z, low, labels)
        pred = model(images + high.view(shape) * z, high, labels)
        dist = ((pred - target) ** 2).flatten(1).sum(1).add(self.huber_c ** 2).sqrt() - self.huber_c
        return (dist / (high - low)).mean()


def loss(config: dict) -> ConsistencyLoss:
    c = _config(config)
    levels = karras_levels(c.sigma_min, c.sigma_max, c.rho, c.num_scales)
    cdf = torch.erf((levels.log() - c.p_mean) / (math.sqrt(2) * c.p_std))
    huber_c = c.huber_c if c.huber_c is not None else 0.00054 * math.sqrt(math.prod(config["image_shape"]))
    mass = cdf[1:] - cdf[:-1]  # lognormal mass between consecutive levels
    return ConsistencyLoss(levels, (mass / mass.sum()).float(), huber_c)


def build(config: dict) -> ConsistencyPrecond:
    c = _config(config)
    return ConsistencyPrecond(unet.from_config(config), c.sigma_data, c.sigma_min, c.sigma_max)


class MultistepSettings(Options):
    num_steps: Annotated[int, Field(ge=1, le=8)] = 4  # network evaluations (x2 with guidance); fewer = more mode-seeking
    sigma_high: Annotated[float, Field(gt=0.002)] = 2.0  # first re-noise level (step 2 of 3 or more)
    sigma_low: Annotated[float, Field(gt=0.002)] = 1.0  # last re-noise level; the only one when num_steps = 2
    rho: Annotated[float, Field(gt=0)] = 7.0  # spacing of the re-noise levels between sigma_high and sigma_low
    guidance: Annotated[float, Field(ge=0)] = 1.0  # classifier-free guidance scale (conditional models); > 1 is mode-seeking

    @model_validator(mode="after")
    def _ordered(self):
        if self.sigma_low > self.sigma_high:
            raise ValueError(f"sigma_low ({self.sigma_low}) must not exceed sigma_high ({self.sigma_high})")
        return self


def renoise_levels(s: MultistepSettings) -> list[float]:
    """The num_steps - 1 noise levels that multistep sampling re-noises to, high to low."""
    k = s.num_steps - 1
    if k <= 1:
        return [s.sigma_low] * k
    return karras_levels(s.sigma_low, s.sigma_high, s.rho, k).flip(0).tolist()


@torch.no_grad()
def sample(model: ConsistencyPrecond, latents: torch.Tensor, settings: MultistepSettings, labels=None,
           noise=None) -> torch.Tensor:
    """Multistep consistency sampling: jump to data, re-noise to the next level with fresh per-sample noise, jump again."""
    def f(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, device=x.device)
        return guided(model, x.to(torch.float32), sig, labels, settings.guidance)

    x0 = f(latents.to(torch.float64) * model.sigma_max, model.sigma_max)
    for level in renoise_levels(settings):
        x0 = f(x0 + math.sqrt(level ** 2 - model.sigma_min ** 2) * noise(x0.shape).to(x0), level)
    return x0.to(torch.float32)


FAMILY = register(Family(
    name="consistency",
    summary="Consistency model (improved consistency training), 1-8 step sampler; "
            "mode-seeking: fewer steps (num_steps 1), guidance > 1",
    Config=ConsistencyConfig, Settings=MultistepSettings, build=build, loss=loss, sample=sample))
