"""The model config a stage builds or expects: params.yaml's `model` section plus the data's image shape."""
from __future__ import annotations

from stages.artifacts import read_manifest
from stages.common import DATA
from stages.params import ModelParams


def model_config(p: ModelParams) -> dict:
    shape = read_manifest(DATA)["data"]["shape"]
    return {**p.model_dump(exclude={"family"}), "image_shape": shape}


def conditioning_labels(p: ModelParams, labels):
    """The labels a conditional model trains on (None for an unconditional one), checked against the data."""
    if not p.label_dim:
        return None
    classes = read_manifest(DATA)["data"].get("classes", 0)
    if labels is None or classes != p.label_dim:
        raise ValueError(f"model.label_dim = {p.label_dim} but the data has {classes or 'no'} classes; "
                         f"set model.label_dim to {classes} (or 0 for an unconditional model)")
    return labels


def expected(p: ModelParams) -> dict:
    """What a fetched checkpoint must agree with: the family, the data's shape and the architecture."""
    cfg = model_config(p)
    return {"family": p.family, "image_shape": cfg["image_shape"], "channels": cfg["channels"],
            "emb_dim": cfg["emb_dim"], "label_dim": cfg["label_dim"]}


def load(path, p: ModelParams):
    """(model, family, config) from a checkpoint; plain state dicts take their architecture from params."""
    from models import checkpoint

    return checkpoint.load_model(path, expect=expected(p), fallback=(p.family, model_config(p)))
