"""The model config a stage builds or expects: params.yaml's `model` section plus the data's image shape."""
from __future__ import annotations

from stages.artifacts import read_manifest
from stages.common import DATA
from stages.params import ModelParams


def model_config(p: ModelParams) -> dict:
    shape = read_manifest(DATA)["data"]["shape"]
    return {**p.model_dump(exclude={"family"}), "image_shape": shape}


def expected(p: ModelParams) -> dict:
    """What a fetched checkpoint must agree with: the family, the data's shape and the architecture."""
    cfg = model_config(p)
    return {"family": p.family, "image_shape": cfg["image_shape"], "channels": cfg["channels"],
            "emb_dim": cfg["emb_dim"]}


def load(path, p: ModelParams):
    """(model, family, config) from a checkpoint; plain state dicts take their architecture from params."""
    from models import checkpoint

    return checkpoint.load_model(path, expect=expected(p), fallback=(p.family, model_config(p)))
