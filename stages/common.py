"""What every stage shares: artifact locations, the device, progress lines, loading earlier artifacts."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from models.errors import InputError
from stages.artifacts import cpu_info

ARTIFACTS = Path("artifacts")
WORK = Path(".neon/work")  # resumable partial work (e.g. sample shards); never a DVC output

DATA, REFERENCE, TRAIN, BASE = ARTIFACTS / "data", ARTIFACTS / "reference", ARTIFACTS / "train", ARTIFACTS / "base"
SYNTHETIC, SELFTRAINED, MERGED, EVALUATE = (ARTIFACTS / "synthetic", ARTIFACTS / "selftrained",
                                            ARTIFACTS / "merged", ARTIFACTS / "evaluate")
RESULTS = Path("results")  # DVC metrics and plots, small enough for git
MODEL_FILE = "model.safetensors"


class StageError(InputError, RuntimeError):
    """A problem with the stage's inputs that the user must fix; its message names the fix."""


def device() -> torch.device:
    """CUDA when there is a GPU (NEON_DEVICE=cpu forces the CPU); under torchrun each process its own GPU, LOCAL_RANK."""
    if not torch.cuda.is_available() or os.environ.get("NEON_DEVICE") == "cpu":
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local)) if local else torch.device("cuda")


def device_name(dev: torch.device) -> str:
    """The device as a reader needs it to tell why two runs' bytes differ: the CPU model, ATen's
    vector capability and the thread count, or the GPU model (the full record is the manifest's `numerics`)."""
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    model = cpu_info().get("model_name") or "unknown CPU"
    return f"cpu ({model}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def log(msg: str) -> None:
    print(msg, flush=True)


def progress(label: str):
    t0 = time.monotonic()

    def report(done: int, total: int, figures: dict | None = None) -> None:
        figs = "".join(f"  {k} {v:.4g}" for k, v in (figures or {}).items())
        log(f"[{label}] {done}/{total} ({100 * done / total:.0f}%)  {time.monotonic() - t0:.1f}s{figs}")
    return report


def save_images(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_images(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as z:
        return z["images"], (z["labels"] if "labels" in z.files else None)


def load_data() -> tuple[torch.Tensor, torch.Tensor | None]:
    images, labels = load_images(DATA / "images.npz")
    return torch.from_numpy(images), None if labels is None else torch.from_numpy(labels)

