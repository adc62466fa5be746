"""A small U-Net for low-resolution images, conditioned on a noise level (and optionally a class).

Deliberately small: the embedded default trains it on two CPU cores in minutes.
"""
import math
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
import torch.nn.functional as F


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (the noise conditioning c_noise)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        args = x.float()[:, None] * freqs[None, :]
        return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out * 2)  # scale and shift (adaptive group norm)
        self.norm2 = _group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """U-Net over (N, C, H, W) images; `channels[i]` is the width at resolution H / 2**i."""

    def __init__(self, image_channels: int = 1, channels: tuple[int, ...] = (32, 64, 64),
                 emb_dim: int = 128, label_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.label_dim = label_dim
        self.noise_embed = nn.Sequential(FourierEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                         nn.Linear(emb_dim, emb_dim))
        # Row `label_dim` is the "no label" embedding used for unconditional (guidance) passes.
        self.label_embed = nn.Embedding(label_dim + 1, emb_dim) if label_dim else None
        self.conv_in = nn.Conv2d(image_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(channels):
            c_prev = channels[max(i - 1, 0)]
            self.down.append(ResBlock(c_prev, c, emb_dim, dropout))
            self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(channels) - 1 else nn.Identity())
        self.mid = ResBlock(channels[-1], channels[-1], emb_dim, dropout)
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            c_out = channels[max(i - 1, 0)]
            self.up.append(ResBlock(2 * channels[i], c_out, emb_dim, dropout))
        self.norm_out = _group_norm(channels[0])
        self.conv_out = nn.Conv2d(channels[0], image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.noise_embed(noise_cond)
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.label_dim, device=x.device, dtype=torch.long)
            emb = emb + self.label_embed(labels)
        emb = F.silu(emb)
        h = self.conv_in(x)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class UNetConfig(BaseModel):
    """The U-Net options the image families share (params.yaml `model.<family>`)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    channels: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1, max_length=4)] = [16, 32, 32]  # widths at H, H/2, H/4, ...
    emb_dim: Annotated[int, Field(gt=0, multiple_of=2)] = 64  # noise/time-embedding width
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout inside residual blocks


def from_config(config: dict) -> UNet:
    """The U-Net a family's full config describes (channels from the data's image shape)."""
    return UNet(image_channels=config["image_shape"][0], channels=tuple(config["channels"]),
                emb_dim=config["emb_dim"], label_dim=config.get("label_dim", 0), dropout=config.get("dropout", 0.0))
