"""Drawing images from any family with per-sample seeds: sample i's noise depends only on seed + i.

Its pixels also depend (by float rounding, at most one grey level) on which batch it shares, so
callers that promise bit-identical sets keep batch boundaries fixed.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from models.errors import NonFiniteError
from models.family import Family
from models.training import to_uint8


class PerSampleNoise:
    """A stack of generators, one per sample, so a sample's noise never depends on its batch."""

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def __call__(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        # Drawn on the CPU whatever the device, so a seed gives the same image on any machine.
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]).to(self.device)


def class_labels(indices: Iterable[int], label_dim: int) -> torch.Tensor | None:
    """Balanced, deterministic classes: sample i gets class i mod label_dim (None when unconditional)."""
    return torch.tensor([i % label_dim for i in indices], dtype=torch.long) if label_dim else None


def generate(model: nn.Module, family: Family, settings, image_shape: tuple[int, ...], seeds: list[int],
             batch_size: int, labels: torch.Tensor | None = None, device: torch.device | str = "cpu",
             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """uint8 images (len(seeds), *image_shape) for the given per-sample seeds (float32 points for vector families)."""
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        noise = PerSampleNoise(chunk, device)
        latents = noise((len(chunk), *image_shape))
        lab = None if labels is None else labels[start:start + batch_size].to(device)
        images = family.sample(model, latents, settings, lab, noise)
        if not torch.isfinite(images).all():
            raise NonFiniteError(f"the sampler produced NaN/inf images for seeds {chunk[0]}..{chunk[-1]}: "
                                     "the model's weights are broken (e.g. a too large |w|) or the sampler diverged")
        out.append((to_uint8(images) if family.data_kind == "image" else images.to(torch.float32)).cpu())
        if progress:
            progress(start + len(chunk), len(seeds))
    return torch.cat(out)
