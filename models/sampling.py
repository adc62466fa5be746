"""Drawing images from any family with per-sample seeds: sample i's noise depends only on seed + i.

Its pixels also depend (by float rounding, at most one grey level) on which batch it shares, so
callers that promise bit-identical sets keep batch boundaries fixed.

Noise on the CPU comes from one `torch.Generator` per sample (the draws every CPU artifact was made
with). On a CUDA device it is generated there by a counter-based generator (Philox4x32-10, the
generator cuRAND and torch's CUDA RNG are built on) keyed by the sample's seed: one set of batched
kernels for the whole batch, where one CUDA generator per sample costs a kernel launch per sample and
per call (bench/sample.py measures both), and where CPU draws cost a host-to-device copy each call.
A seed then gives the same image on the same kind of device, but not the CPU's image.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

from models.errors import NonFiniteError
from models.family import Family
from models.training import to_uint8

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox4x32 round multipliers (Salmon et al. 2011, Random123)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments
PHILOX_ROUNDS = 10


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * m, for a in [0, 2^32) held in int64 and a 32-bit constant m.

    m is split into 16-bit halves so no int64 product exceeds 2^48: torch does not promise wrapping on
    int64 overflow, and this never overflows.
    """
    p1, p0 = a * (m >> 16), a * (m & 0xFFFF)  # a * m = p1 * 2^16 + p0
    t = p0 + ((p1 & 0xFFFF) << 16)
    return (p1 >> 16) + (t >> 32), t & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32-R on int64 tensors holding uint32 values (broadcast together): four uint32 outputs."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


class PhiloxNormal:
    """Per-sample N(0, 1) streams from Philox4x32-10, computed for a whole batch at once on any device.

    Sample i's key is its seed (mod 2^64); the counter is the index of a block of four normals in its
    stream, which advances across calls as a per-sample generator would. So a sample's noise depends on
    its seed and on how much it drew before, never on its batch or its position in it. Normals come from
    Box-Muller in float64 on uniforms (u + 0.5) / 2^32, in (0, 1), returned as float32.
    """

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu"):
        seeds = [int(s) % (1 << 64) for s in seeds]
        self.device = torch.device(device)
        keys = torch.tensor([[s & _MASK32, s >> 32] for s in seeds], dtype=torch.int64).reshape(-1, 2)
        keys = keys.to(self.device)
        self.key = (keys[:, :1], keys[:, 1:])
        self.blocks_drawn = 0

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        blocks = -(-numel // 4)
        index = torch.arange(self.blocks_drawn, self.blocks_drawn + blocks, dtype=torch.int64, device=self.device)
        self.blocks_drawn += blocks
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        x0, x1, x2, x3 = philox4x32((index & _MASK32, index >> 32, zero, zero), self.key)
        scale = 2.0 ** -32
        out = []
        for a, b in ((x0, x1), (x2, x3)):
            radius = ((a.to(torch.float64) + 0.5) * scale).log().mul(-2.0).sqrt()
            angle = ((b.to(torch.float64) + 0.5) * scale) * (2 * math.pi)
            out += [radius * angle.cos(), radius * angle.sin()]
        z = torch.stack(out, dim=-1).reshape(len(self.key[0]), blocks * 4)[:, :numel]
        return z.to(torch.float32).reshape(len(self.key[0]), *shape)


class PerSampleNoise:
    """Per-sample noise streams, so a sample's noise never depends on its batch.

    method "generators": one CPU `torch.Generator` per sample, copied to `device` (today's CPU draws);
    "philox": `PhiloxNormal` on `device`; "auto": philox on CUDA, generators elsewhere.
    """

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu",
                 method: Literal["auto", "generators", "philox"] = "auto"):
        seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        if method == "auto":
            method = "philox" if self.device.type == "cuda" else "generators"
        if method not in ("generators", "philox"):
            raise ValueError(f"unknown noise method {method!r}: auto, generators or philox")
        self.method, self.count = method, len(seeds)
        if method == "philox":
            self.philox = PhiloxNormal(seeds, self.device)
        else:
            self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        if shape[0] != self.count:
            raise ValueError(f"noise for {shape[0]} samples asked of {self.count} per-sample streams")
        if self.method == "philox":
            return self.philox(tuple(shape[1:]))
        # Drawn on the CPU, so a seed gives the same image on any CPU.
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]).to(self.device)


def class_labels(indices: Iterable[int], label_dim: int) -> torch.Tensor | None:
    """Balanced, deterministic classes: sample i gets class i mod label_dim (None when unconditional)."""
    return torch.tensor([i % label_dim for i in indices], dtype=torch.long) if label_dim else None


def generate(model: nn.Module, family: Family, settings, image_shape: tuple[int, ...], seeds: list[int],
             batch_size: int, labels: torch.Tensor | None = None, device: torch.device | str = "cpu",
             progress: Callable[[int, int], None] | None = None,
             noise_method: Literal["auto", "generators", "philox"] = "auto") -> torch.Tensor:
    """uint8 images (len(seeds), *image_shape) for the given per-sample seeds (float32 points for vector families).

    `noise_method` picks the noise streams (`PerSampleNoise`): auto is Philox on CUDA, CPU generators elsewhere.
    """
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        noise = PerSampleNoise(chunk, device, noise_method)
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
