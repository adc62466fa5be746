"""The model config a stage builds or expects: the active family's `model.<family>` options, the shared
conditioning options, and the data's shape."""
from __future__ import annotations

from models import family as families
from stages.artifacts import read_manifest
from stages.common import DATA, StageError
from stages.params import ModelParams


def model_config(p: ModelParams) -> dict:
    data = read_manifest(DATA)["data"]
    kind, want = data.get("kind", "image"), families.get(p.family).data_kind
    if kind != want:
        hint = "data.source: toy2d" if want == "vector" else "an image data.source (e.g. mnist)"
        raise StageError(f"model.family = {p.family} generates {want} data but data.source gives {kind} data; "
                         f"use {hint} or another model.family")
    return {**p.family_config(), "image_shape": data["shape"]}


def conditioning_labels(p: ModelParams, labels):
    """The labels a conditional model trains on (None for an unconditional one), checked against the data."""
    if not p.label_dim:
        return None
    classes = read_manifest(DATA)["data"].get("classes", 0)
    if labels is None or classes != p.label_dim:
        raise StageError(f"model.label_dim = {p.label_dim} but the data has {classes or 'no'} classes; "
                         f"set model.label_dim to {classes} (or 0 for an unconditional model)")
    return labels


def expected(p: ModelParams) -> dict:
    """What a fetched checkpoint must agree with: the family and what the data fixes (shape, classes).

    The architecture itself comes from the checkpoint's own metadata, which describes it exactly.
    """
    cfg = model_config(p)
    return {"family": p.family, "image_shape": cfg["image_shape"], "label_dim": cfg["label_dim"]}


def load(path, p: ModelParams):
    """(model, family, config) from a checkpoint; plain state dicts take their architecture from params."""
    from models import checkpoint

    return checkpoint.load_model(path, expect=expected(p), fallback=(p.family, model_config(p)))

