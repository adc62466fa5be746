"""Flow matching with the rectified-flow path (Liu et al. 2022; Lipman et al. 2022).

x_t = (1 - t) x_0 + t eps, t in [0, 1]; the network predicts the velocity eps - x_0, and sampling
integrates dx/dt from t = 1 (noise) to t = 0 (data) with a fixed-step ODE solver.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from models import unet
from models.family import Family, Options, register
from models.guidance import guided
from models.unet import UNetConfig

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, where the U-Net's sinusoids resolve it


class FlowConfig(UNetConfig):
    logit_mean: float = 0.0  # training times t = sigmoid(N(logit_mean, logit_std^2)): mean of the logit
    logit_std: Annotated[float, Field(gt=0)] = 1.0  # its std; 1 concentrates training on mid-path times


class FlowSettings(Options):
    method: Literal["euler", "heun", "midpoint"] = "euler"  # fixed-step ODE solver
    num_steps: Annotated[int, Field(ge=1, le=1000)] = 10  # solver steps; Euler/midpoint/Heun use 1/2/2 calls each; fewer = more mode-seeking
    guidance: Annotated[float, Field(ge=0)] = 1.0  # classifier-free guidance scale (conditional models); > 1 is mode-seeking


class VelocityNet(nn.Module):
    """v(x, t): the U-Net with the time as its conditioning scalar."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x.to(torch.float32), t.reshape(-1).to(torch.float32) * TIME_SCALE, labels)


@dataclass(frozen=True)
class FlowLoss:
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        n = images.shape[0]
        t = torch.sigmoid(torch.randn(n, generator=generator, device=images.device) * self.logit_std + self.logit_mean)
        eps = torch.randn(images.shape, generator=generator, device=images.device)
        tb = t.reshape(-1, *([1] * (images.dim() - 1)))
        x_t = (1 - tb) * images + tb * eps
        return ((model(x_t, t, labels) - (eps - images)) ** 2).mean()


@torch.no_grad()
def flow_sample(model: nn.Module, latents: torch.Tensor, settings: FlowSettings,
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate from t = 1 to t = 0 on a uniform time grid; deterministic given the latents."""
    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device)
        return guided(model, x.to(torch.float32), tt, labels, settings.guidance)

    x = latents.to(torch.float64)
    grid = torch.linspace(1.0, 0.0, settings.num_steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t  # negative: time runs backwards
        v = velocity(x, t)
        if settings.method == "euler":
            x = x + h * v
        elif settings.method == "midpoint":
            x = x + h * velocity(x + 0.5 * h * v, t + 0.5 * h)
        else:  # heun: trapezoidal correction with the slope at the end of the step
            x = x + 0.5 * h * (v + velocity(x + h * v, t_next))
    return x.to(torch.float32)


def build(config: dict) -> VelocityNet:
    return VelocityNet(unet.from_config(config))


def loss(config: dict) -> FlowLoss:
    return FlowLoss(config.get("logit_mean", 0.0), config.get("logit_std", 1.0))


def sample(model: nn.Module, latents: torch.Tensor, settings: FlowSettings, labels=None, noise=None) -> torch.Tensor:
    return flow_sample(model, latents, settings, labels)


FAMILY = register(Family(
    name="flow", summary="rectified flow matching, fixed-step ODE; mode-seeking: few Euler steps, guidance > 1",
    Config=FlowConfig, Settings=FlowSettings, build=build, loss=loss, sample=sample))
