"""A small CNN classifier whose penultimate layer is the feature space for FID on small grayscale images."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from models.training import to_unit_range


class FeatureNet(nn.Module):
    def __init__(self, image_channels: int = 1, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(image_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.LazyLinear(feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.body(to_unit_range(images_u8))

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images_u8))


def train_classifier(images_u8: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, lr: float,
                     seed: int, progress=None) -> FeatureNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = FeatureNet(images_u8.shape[1], int(labels.max()) + 1)
    net(images_u8[:2])  # materialise the lazy layer before the optimizer sees it
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(1, steps + 1):
        idx = torch.randint(0, images_u8.shape[0], (batch_size,), generator=gen)
        loss = F.cross_entropy(net(images_u8[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step % max(steps // 5, 1) == 0 or step == steps):
            progress(step, steps, {"loss": loss.item()})
    return net.eval()


@torch.no_grad()
def extract(net: FeatureNet, images_u8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([net.features(images_u8[i:i + batch_size]) for i in range(0, len(images_u8), batch_size)])


@torch.no_grad()
def accuracy(net: FeatureNet, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    return (net(images_u8).argmax(1) == labels).float().mean().item()
