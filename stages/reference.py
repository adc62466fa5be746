"""Stage `reference`: the feature spaces FID is computed in, and the real data's statistics in each.

- `classifier`: the penultimate layer of a CNN trained here on the real data (fast, faithful for
  small grayscale images);
- `inception`: clean-fid's clean-mode Inception-v3 features (the field's FID), offline;
- `raw`: for 2D points (the paper's toy), the coordinates themselves: FID in closed form.
Each space's statistics are written as `<space>.npz` with `mu` and `sigma` (the layout clean-fid and
EDM use) plus the real `features` that precision/recall and KID need.

Statistics a user already has (`reference.stats`, a .npz with `mu` and `sigma`) are imported as the
statistics of `reference.stats_space` instead of computed. They usually carry no real features, so
that space has FID but no KID or precision/recall. Unlabelled data has no classifier space: its
Inception space (imported or computed) is then the only one.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.classifier import FeatureNet, accuracy, extract, train_classifier
from models.inception import FEATURE_DIM, InceptionFeatures
from models.metrics import statistics
from stages import store
from stages.artifacts import artifact, input_ref, read_manifest, sha256_bytes, verify
from stages.common import DATA, REFERENCE, WORK, StageError, device, load_data, log, progress

if TYPE_CHECKING:  # annotations only: validating params (all families' schemas) is the entry point's job
    from stages.params import ReferenceParams

INCEPTION_DIR = WORK / "inception"  # clean-fid's Inception file, written once from the shipped network


@dataclass
class FeatureSpace:
    name: str
    extract: Callable[[torch.Tensor], np.ndarray]  # uint8 images -> (N, D) float64 features
    mu: np.ndarray
    sigma: np.ndarray
    real: np.ndarray  # real features (for precision/recall and KID); (0, D) for imported statistics without them

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


@dataclass
class ImportedStats:
    space: str
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None  # when the file has them (this pipeline's own export does)
    ref: dict  # how the manifest names the file: path and sha256


def _space_dim(space: str) -> int:
    return FEATURE_DIM if space == "inception" else FeatureNet().head.in_features


def _read_bytes(location: str) -> bytes:
    try:
        if location.startswith("s3://"):
            return store.filesystem().cat_file(location[len("s3://"):])
        return Path(location).expanduser().read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise StageError(f"reference.stats = {location}: no such file; point it at a .npz with mu and sigma, "
                         "or set reference.stats: '' to compute the statistics") from None
    except Exception as exc:  # S3: credentials, endpoint, permissions
        raise StageError(f"reference.stats = {location}: cannot be read ({type(exc).__name__}: {exc}); check the "
                         "location and, for s3://, AWS credentials and AWS_ENDPOINT_URL_S3") from None


def import_stats(location: str, space: str) -> ImportedStats:
    """Statistics from a .npz with `mu` (D,) and `sigma` (D, D), checked against the space's dimension."""
    raw = _read_bytes(location)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as exc:
        raise StageError(f"reference.stats = {location}: not a readable .npz ({exc}); "
                         "give the .npz clean-fid or EDM wrote (arrays mu and sigma)") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise StageError(f"reference.stats = {location}: has no {' or '.join(missing)} (it holds "
                         f"{', '.join(arrays) or 'nothing'}); give a .npz with mu (D,) and sigma (D, D), as clean-fid "
                         "and EDM write")
    mu, sigma, dim = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64), _space_dim(space)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise StageError(f"reference.stats = {location}: mu {mu.shape} / sigma {sigma.shape} are not the {dim}-d "
                         f"{space} space; set reference.stats_space to the space they were computed in "
                         "(inception: 2048-d), or give that space's statistics")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StageError(f"reference.stats = {location}: mu or sigma contain NaN or inf; recompute the statistics")
    features = arrays.get("features", arrays.get("feats"))  # ours, clean-fid's KID layout
    if features is not None and (features.ndim != 2 or features.shape[1] != dim):
        features = None  # not features of this space: FID still stands on mu and sigma
    return ImportedStats(space, mu, sigma, None if features is None else features.astype(np.float64),
                         {"path": location, "sha256": sha256_bytes(raw)})


def _save_imported(out, stats: ImportedStats) -> dict:
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    with open(out.path(f"{stats.space}.npz"), "wb") as f:
        np.savez(f, **arrays)
    log(f"[reference] {stats.space} space: statistics imported from {stats.ref['path']}"
        + ("" if stats.features is not None else " (no real features: no KID or precision/recall in this space)"))
    return {"dim": int(stats.mu.shape[0]), "count": 0 if stats.features is None else len(stats.features),
            "imported": stats.ref}


def run(p: ReferenceParams) -> dict:
    images, labels = load_data()
    data = read_manifest(DATA)["data"]
    inputs = {"data": input_ref(DATA)}
    if data.get("kind") == "vector":
        if p.stats:
            raise StageError("reference.stats is for image data; point data is compared in its own coordinates: "
                             "set reference.stats: ''")
        with artifact(REFERENCE, "reference", p.model_dump(), inputs=inputs) as out:
            out.extra["reference"] = {"spaces": _raw_space(out, images.numpy().astype(np.float64), data.get("population"))}
        return out.manifest
    imported = import_stats(p.stats, p.stats_space) if p.stats else None  # checked before any training
    if imported:
        inputs["stats"] = imported.ref
    if labels is None:
        _check_unlabelled(p, imported)
    with artifact(REFERENCE, "reference", p.model_dump(), inputs=inputs) as out:
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(p.seed))
        spaces = {}
        if labels is not None:
            held_out, fit_idx = perm[: len(images) // 10], perm[len(images) // 10:]
            net = train_classifier(images[fit_idx], labels[fit_idx], p.steps, p.batch_size, p.lr, p.seed,
                                   progress("reference: classifier"))
            acc = accuracy(net, images[held_out], labels[held_out])
            save_file(net.state_dict(), str(out.path("classifier.safetensors")))
            log(f"[reference] classifier space: held-out accuracy {acc:.3f}")
            if imported and imported.space == "classifier":
                spaces["classifier"] = _save_imported(out, imported)
            else:
                _save_stats(out.path("classifier.npz"), extract(net, images).to(torch.float64).numpy())
                spaces["classifier"] = {"dim": int(net.head.in_features), "count": len(images)}
                log(f"[reference] classifier space: statistics over {len(images)} real images")
            spaces["classifier"]["held_out_accuracy"] = round(acc, 4)
        else:
            log("[reference] unlabelled data: no classifier space; the Inception space is the primary one")
        if imported and imported.space == "inception":
            spaces["inception"] = _save_imported(out, imported)
        elif p.inception_n:
            subset = images[perm[: p.inception_n]]
            feats = InceptionFeatures(INCEPTION_DIR, device())(subset, progress=progress("reference: inception"))
            _save_stats(out.path("inception.npz"), feats.numpy())
            spaces["inception"] = {"dim": FEATURE_DIM, "count": len(subset)}
            log(f"[reference] inception space: statistics over {len(subset)} real images")
        out.extra["reference"] = {"spaces": spaces}
    return out.manifest


def _check_unlabelled(p: ReferenceParams, imported: ImportedStats | None) -> None:
    """The classifier space is a classifier trained on the labels: without labels only Inception is left."""
    if imported and imported.space == "classifier":
        raise StageError("reference.stats_space = classifier needs the classifier trained here, which needs labelled "
                         "data (class sub-folders or dataset.json); import Inception statistics instead "
                         "(reference.stats_space: inception) or label the data")
    if not imported and not p.inception_n:
        raise StageError("the data has no labels, and the classifier feature space needs them (class sub-folders or "
                         "a dataset.json); label the data, or set reference.stats to an Inception .npz (mu, sigma) "
                         "or reference.inception_n > 0 to compute Inception statistics")


def load_spaces() -> dict[str, FeatureSpace]:
    """The feature spaces the reference artifact holds, ready to embed generated images."""
    verify(REFERENCE)
    manifest = read_manifest(REFERENCE)
    shape = read_manifest(Path(manifest["inputs"]["data"]["path"]))["data"]["shape"]
    spaces = {}
    for name in manifest["reference"]["spaces"]:
        with np.load(REFERENCE / f"{name}.npz", allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
            real = z["features"].astype(np.float64) if "features" in z.files else np.zeros((0, mu.shape[0]))
        if name == "raw":
            fn = lambda x: x.to(torch.float64).numpy()  # noqa: E731
        elif name == "classifier":
            state = load_file(str(REFERENCE / "classifier.safetensors"))
            net = FeatureNet(shape[0], state["head.weight"].shape[0], state["head.weight"].shape[1])
            net(torch.zeros(1, *shape, dtype=torch.uint8))  # materialise the lazy layer
            net.load_state_dict(state)
            fn = (lambda net: lambda x: extract(net.eval(), x).to(torch.float64).numpy())(net)
        else:
            inc, dev = InceptionFeatures(INCEPTION_DIR), device()
            fn = lambda x, inc=inc, dev=dev: inc.to(dev)(x).numpy()  # noqa: E731  (to the device on first use)
        spaces[name] = FeatureSpace(name, fn, mu, sigma, real)
    return spaces
