"""Autoregressive pixel model: a small causal transformer over quantised pixels in raster order.

Tokens run row by row, column by column, channel innermost. Sampling turns each latent into a
uniform and draws the token by inverse CDF, so a sample depends only on its own latents (seed).
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from models.family import Family, Options, register


class ARConfig(Options):
    levels: Annotated[int, Field(ge=2, le=256)] = 16  # grey levels a pixel is quantised to (vocabulary size)
    # Small on purpose: full attention over 784 pixels costs ~0.8 CPU-s per step at batch 64 even so
    dim: Annotated[int, Field(gt=0)] = 32  # transformer width (channels per token)
    depth: Annotated[int, Field(ge=1)] = 2  # transformer blocks
    heads: Annotated[int, Field(ge=1)] = 2  # attention heads; must divide dim
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout on attention and residual branches in training

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")
        return self


class ARSettings(Options):
    temperature: Annotated[float, Field(gt=0)] = 0.9  # divides the logits; < 1 is mode-seeking, > 1 diversity-seeking
    top_k: Annotated[int, Field(ge=0)] = 0  # keep only the k likeliest tokens; 0 = off; small k is mode-seeking
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # smallest nucleus holding this mass; 1 = off; < 1 mode-seeking


def to_tokens(images: torch.Tensor, levels: int) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H*W*C) tokens in raster order."""
    tokens = ((images.clamp(-1, 1) + 1) / 2 * (levels - 1)).round().long()
    return tokens.permute(0, 2, 3, 1).reshape(images.shape[0], -1)


def to_images(tokens: torch.Tensor, levels: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, H*W*C) tokens -> (N, C, H, W) in [-1, 1]."""
    c, h, w = shape
    return (tokens.to(torch.float32) / (levels - 1) * 2 - 1).reshape(-1, h, w, c).permute(0, 3, 1, 2)


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP; with a KV cache it advances one position at a time."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: int = 0) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        else:  # the new positions see everything cached so far (t = 1 when sampling)
            keys, values = cache
            keys[:, :, pos:pos + t], values[:, :, pos:pos + t] = k, v
            att = F.scaled_dot_product_attention(q, keys[:, :, :pos + t], values[:, :, :pos + t])
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(n, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class PixelTransformer(nn.Module):
    """Next-token logits; the start token's embedding is the class embedding (row label_dim = no label)."""

    def __init__(self, image_shape, levels: int, label_dim: int, dim: int, depth: int, heads: int, dropout: float):
        super().__init__()
        self.image_shape, self.levels, self.label_dim = tuple(image_shape), levels, label_dim
        self.length = math.prod(self.image_shape)
        self.token_embed = nn.Embedding(levels, dim)
        self.start_embed = nn.Embedding(label_dim + 1, dim)
        self.position = nn.Parameter(torch.randn(self.length, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, levels)

    def start(self, n: int, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            labels = torch.full((n,), self.label_dim, dtype=torch.long, device=self.position.device)
        return self.start_embed(labels.long())[:, None]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (N, L, levels) for every position given the tokens before it."""
        x = torch.cat([self.start(tokens.shape[0], labels), self.token_embed(tokens[:, :-1])], 1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def step(self, x: torch.Tensor, caches: list, pos: int) -> torch.Tensor:
        """Logits (N, levels) for position pos from its input embedding x (N, 1, dim), filling the caches."""
        x = x + self.position[pos]
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, pos)
        return self.head(self.norm(x))[:, 0]


def build(config: dict) -> PixelTransformer:
    return PixelTransformer(config["image_shape"], config["levels"], config.get("label_dim", 0),
                            config["dim"], config["depth"], config["heads"], config.get("dropout", 0.0))


def loss(config: dict):
    """Next-token cross-entropy in nats per token, averaged over all tokens."""
    def cross_entropy(model: PixelTransformer, images: torch.Tensor, labels=None, generator=None) -> torch.Tensor:
        tokens = to_tokens(images, model.levels)
        return F.cross_entropy(model(tokens, labels).flatten(0, 1).float(), tokens.flatten())
    return cross_entropy


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask of the smallest set of likeliest tokens whose mass reaches top_p (per row)."""
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p)


def filtered_probs(logits: torch.Tensor, s: ARSettings) -> torch.Tensor:
    """Temperature, then top-k, then top-p; float64, unnormalised zeros where filtered out."""
    probs = torch.softmax(logits.to(torch.float64) / s.temperature, -1)
    if 0 < s.top_k < probs.shape[-1]:
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs.topk(s.top_k, -1).indices, True)
        probs = probs * keep
    if s.top_p < 1:
        probs = probs * nucleus(probs / probs.sum(-1, keepdim=True), s.top_p)
    return probs


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds u (N,) in [0, 1]; never a token of zero probability."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # u = 1 would land past the last kept token: stay just below the total mass
    v = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, v, right=True)[:, 0]


@torch.no_grad()
def sample(model: PixelTransformer, latents: torch.Tensor, settings: ARSettings, labels=None,
           noise=None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1]; token i of sample j is drawn with u = Phi(latent j, raster position i)."""
    n = latents.shape[0]
    z = latents.to(torch.float64).permute(0, 2, 3, 1).reshape(n, -1)
    u = 0.5 * torch.erfc(-z / math.sqrt(2))  # normal CDF, accurate in the lower tail
    first = model.blocks[0]
    head_dim = first.qkv.in_features // first.heads
    caches = [tuple(latents.new_empty(n, first.heads, model.length, head_dim, dtype=model.position.dtype)
                    for _ in range(2)) for _ in model.blocks]
    x = model.start(n, labels)
    tokens = torch.empty(n, model.length, dtype=torch.long, device=latents.device)
    for pos in range(model.length):
        tokens[:, pos] = inverse_cdf(filtered_probs(model.step(x, caches, pos), settings), u[:, pos])
        x = model.token_embed(tokens[:, pos:pos + 1])
    return to_images(tokens, model.levels, model.image_shape)


FAMILY = register(Family(
    name="ar", summary="autoregressive pixel transformer (raster order, quantised grey levels); "
                       "mode-seeking: temperature < 1, top_k > 0 small, top_p < 1",
    Config=ARConfig, Settings=ARSettings, build=build, loss=loss, sample=sample))
