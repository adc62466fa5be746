"""Stage `reference`: the feature spaces FID is computed in, and the real data's statistics in each.

- `classifier`: the penultimate layer of a CNN trained here on the real data (fast, faithful for
  small grayscale images);
- `inception`: clean-fid's clean-mode Inception-v3 features (the field's FID), offline;
- `raw`: for 2D points (the paper's toy), the coordinates themselves: FID in closed form.
Each space's statistics are written as `<space>.npz` with `mu` and `sigma` (the layout clean-fid and
EDM use) plus the real `features` that precision/recall and KID need.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.classifier import FeatureNet, accuracy, extract, train_classifier
from models.inception import FEATURE_DIM, InceptionFeatures
from models.metrics import statistics
from stages.artifacts import artifact, input_ref, read_manifest, verify
from stages.common import DATA, REFERENCE, WORK, load_data, log, progress
from stages.params import ReferenceParams

INCEPTION_DIR = WORK / "inception"  # clean-fid's Inception file, written once from the shipped network


@dataclass
class FeatureSpace:
    name: str
    extract: Callable[[torch.Tensor], np.ndarray]  # uint8 images -> (N, D) float64 features
    mu: np.ndarray
    sigma: np.ndarray
    real: np.ndarray  # real features (for precision/recall and KID)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def _save_stats(path: Path, features: np.ndarray) -> None:
    mu, sigma = statistics(features)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, features=features.astype(np.float32))


def _raw_space(out, points: np.ndarray, population: dict | None) -> dict:
    """Points are their own features; with the exact target known, FID against it is in closed form."""
    mu, sigma = statistics(points)
    if population:
        mu, sigma = np.asarray(population["mean"], np.float64), np.asarray(population["cov"], np.float64)
    with open(out.path("raw.npz"), "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, features=points.astype(np.float32))
    log(f"[reference] raw space: {'exact target' if population else 'sample'} mean and covariance, "
        f"{len(points)} real points")
    return {"raw": {"dim": int(points.shape[1]), "count": len(points), "exact": bool(population)}}


def run(p: ReferenceParams) -> dict:
    images, labels = load_data()
    data = read_manifest(DATA)["data"]
    if data.get("kind") == "vector":
        with artifact(REFERENCE, "reference", p.model_dump(), inputs={"data": input_ref(DATA)}) as out:
            out.extra["reference"] = {"spaces": _raw_space(out, images.numpy().astype(np.float64), data.get("population"))}
        return out.manifest
    if labels is None:
        raise ValueError("the classifier feature space needs labelled real data")
    with artifact(REFERENCE, "reference", p.model_dump(), inputs={"data": input_ref(DATA)}) as out:
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(p.seed))
        held_out, fit_idx = perm[: len(images) // 10], perm[len(images) // 10:]
        net = train_classifier(images[fit_idx], labels[fit_idx], p.steps, p.batch_size, p.lr, p.seed,
                               progress("reference: classifier"))
        acc = accuracy(net, images[held_out], labels[held_out])
        save_file(net.state_dict(), str(out.path("classifier.safetensors")))
        _save_stats(out.path("classifier.npz"), extract(net, images).to(torch.float64).numpy())
        spaces = {"classifier": {"dim": int(net.head.in_features), "count": len(images),
                                 "held_out_accuracy": round(acc, 4)}}
        log(f"[reference] classifier space: held-out accuracy {acc:.3f}, statistics over {len(images)} real images")
        if p.inception_n:
            subset = images[perm[: p.inception_n]]
            feats = InceptionFeatures(INCEPTION_DIR)(subset, progress=progress("reference: inception"))
            _save_stats(out.path("inception.npz"), feats.numpy())
            spaces["inception"] = {"dim": FEATURE_DIM, "count": len(subset)}
            log(f"[reference] inception space: statistics over {len(subset)} real images")
        out.extra["reference"] = {"spaces": spaces}
    return out.manifest


def load_spaces() -> dict[str, FeatureSpace]:
    """The feature spaces the reference artifact holds, ready to embed generated images."""
    verify(REFERENCE)
    manifest = read_manifest(REFERENCE)
    shape = read_manifest(Path(manifest["inputs"]["data"]["path"]))["data"]["shape"]
    spaces = {}
    for name in manifest["reference"]["spaces"]:
        with np.load(REFERENCE / f"{name}.npz", allow_pickle=False) as z:
            mu, sigma, real = z["mu"], z["sigma"], z["features"].astype(np.float64)
        if name == "raw":
            fn = lambda x: x.to(torch.float64).numpy()  # noqa: E731
        elif name == "classifier":
            state = load_file(str(REFERENCE / "classifier.safetensors"))
            net = FeatureNet(shape[0], state["head.weight"].shape[0], state["head.weight"].shape[1])
            net(torch.zeros(1, *shape, dtype=torch.uint8))  # materialise the lazy layer
            net.load_state_dict(state)
            fn = (lambda net: lambda x: extract(net.eval(), x).to(torch.float64).numpy())(net)
        else:
            inc = InceptionFeatures(INCEPTION_DIR)
            fn = lambda x, inc=inc: inc(x).numpy()  # noqa: E731
        spaces[name] = FeatureSpace(name, fn, mu, sigma, real)
    return spaces
