"""Checkpoints as safetensors, with the family and its config in the metadata.

Never unpickles: a pickled checkpoint is refused with instructions to convert it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from models import family as families
from models.errors import InputError

METADATA_KEY = "neon"
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be read safely or does not fit the params."""


def save(path: Path | str, state: dict[str, torch.Tensor], family: str, config: dict[str, Any],
         extra: dict[str, str] | None = None) -> None:
    """Write `state` to `path` (the caller makes it atomic by passing a temporary path)."""
    meta = {"format": "neon-checkpoint/1", "family": family, "config": json.dumps(config, sort_keys=True)}
    meta.update(extra or {})
    # One metadata key holding sorted JSON: safetensors writes several keys in hash order, which
    # would make the same weights give different bytes (and digests) from run to run.
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def _check_not_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors starts with a u64 header length then "{": that length's low bytes can look like a
    # pickle protocol marker (e.g. 0x0380), so only a file that is not safetensors is tested for pickle.
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and head.startswith(PICKLE_MAGIC):
        raise CheckpointError(
            f"{path} is a pickled PyTorch checkpoint, which this pipeline never loads (unpickling runs code). "
            "Convert it once in a trusted environment: `safetensors.torch.save_file(torch.load(p, weights_only=True), "
            "'model.safetensors')`")


def read(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if METADATA_KEY in meta:
            meta = json.loads(meta[METADATA_KEY])
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc}); "
                              "re-download or re-export it") from None


def config_of(meta: dict[str, str], path: Path | str) -> tuple[str, dict[str, Any]]:
    if "family" not in meta or "config" not in meta:
        raise CheckpointError(f"{path} has no `family`/`config` metadata; save it with models.checkpoint.save")
    return meta["family"], json.loads(meta["config"])


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Raise naming the first tensor that is missing, unexpected or of the wrong shape/dtype."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{path} does not match the model architecture: tensor `{missing[0]}` is missing "
                              f"({len(missing)} missing in all); set `model.*` in params.yaml to the checkpoint's architecture")
    if extra:
        raise CheckpointError(f"{path} does not match the model architecture: unexpected tensor `{extra[0]}` "
                              f"({len(extra)} extra in all); set `model.*` in params.yaml to the checkpoint's architecture")
    for name, ref in expected.items():
        got = state[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckpointError(f"{path} does not match the model architecture: tensor `{name}` is "
                                  f"{tuple(got.shape)} {got.dtype}, the model expects {tuple(ref.shape)} {ref.dtype}")


def load_model(path: Path | str, expect: dict[str, Any] | None = None,
               fallback: tuple[str, dict[str, Any]] | None = None) -> tuple[nn.Module, families.Family, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights (eval mode, on CPU).

    `expect` (family and config fields from params) must agree with the checkpoint's own metadata;
    `fallback` (family, config) describes a plain state dict saved without that metadata.
    """
    state, meta = read(path)
    if fallback is not None and "config" not in meta:
        family_name, config = fallback
    else:
        family_name, config = config_of(meta, path)
    for key, want in (expect or {}).items():
        have = family_name if key == "family" else config.get(key)
        if have is not None and _norm(have) != _norm(want):
            raise CheckpointError(f"{path} was saved with {key}={have!r} but params.yaml asks for {want!r}; "
                                  f"set model.{key} (or the data shape) to match the checkpoint")
    family = families.get(family_name)
    model = family.build(config)
    check_compatible(model, state, path)
    model.load_state_dict(state)
    return model.eval(), family, config


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
