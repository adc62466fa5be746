"""The protocol every generator family implements, and the registry the stages look families up in.

A family is a small record of plain functions plus two option schemas: stages call only these, so a
new family changes no stage code. Each family's options live in params.yaml under its own name
(`model.<family>` for the architecture and loss, `sample.sampler.<family>` for the sampler).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from models.errors import ConfigError

# The built-in families, imported on first lookup (each module registers itself).
BUILTIN = ("models.edm", "models.flow", "models.consistency", "models.ar", "models.diffusers_unet", "models.toy")

# (model, batch in model space, labels or None, generator) -> scalar training loss
LossFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", "torch.Generator | None"], torch.Tensor]
# (model, latents ~ N(0, I) shaped like the data, settings, labels or None, noise) -> samples in model space.
# `noise(shape)` draws more per-sample N(0, I) noise (stochastic samplers); labels use `label_dim` as "no label".
SampleFn = Callable[..., torch.Tensor]


class Options(BaseModel):
    """Base of every family's `Config` and `Settings`: unknown keys are errors, values are immutable."""
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Family:
    name: str
    summary: str  # one line: what the family is and which sampler settings are mode-seeking
    Config: type[Options]  # architecture and loss options: params.yaml `model.<name>`
    Settings: type[Options]  # sampler options: params.yaml `sample.sampler.<name>`
    build: Callable[[dict[str, Any]], nn.Module]  # full config (Config + image_shape + label_dim) -> network
    loss: Callable[[dict[str, Any]], LossFn]  # full config -> its own training loss
    sample: SampleFn
    data_kind: Literal["image", "vector"] = "image"  # image: uint8 pixels as [-1, 1]; vector: float points as is
    # A checkpoint folder from another codebase (e.g. a diffusers UNet2DModel) -> (state dict, full config)
    read_folder: Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} registered twice")
    _REGISTRY[family.name] = family
    return family


def _load_builtins() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def all_families() -> dict[str, Family]:
    _load_builtins()
    return dict(_REGISTRY)


def get(name: str) -> Family:
    families = all_families()
    try:
        return families[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(families))}") from None
