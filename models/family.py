"""The protocol every generator family implements, and the registry the stages look families up in.

A family is a small record of plain functions: stages call only these, so a new family changes no
stage code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

# (model, images in [-1, 1], labels or None, generator) -> scalar training loss
LossFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", "torch.Generator | None"], torch.Tensor]
# (model, latents, settings, labels or None, per-sample noise source) -> images in [-1, 1]
SampleFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[dict[str, Any]], nn.Module]  # model config (incl. image_shape) -> model
    loss: Callable[[dict[str, Any]], LossFn]  # model config -> training loss
    sample: SampleFn
    sampler_settings: Callable[[dict[str, Any]], Any]  # params dict -> validated settings object


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} registered twice")
    _REGISTRY[family.name] = family
    return family


def get(name: str) -> Family:
    from models import edm  # noqa: F401  (registers the built-in families)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
