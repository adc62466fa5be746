"""Kill-and-resume for the training stages (`train`, `finetune`): snapshots of the training loop's state.

A snapshot is one safetensors file, `step-NNNNNNNN.safetensors` in the stage's work folder: every tensor
of the state (weights, EMA, optimizer moments, RNG states, data order) plus, in its metadata, a JSON of
the rest with each tensor replaced by its name. It is written atomically, then sealed with its sha256
(`stages.artifacts.seal`); it is trusted only while it matches that seal, so one cut short by a kill
or changed on disk is skipped and the stage falls back to an older one, or to step 0.

The work folder is keyed by the inputs' digests, the params (without `snapshot_every`, which changes
no result) and the stage's code digest, so a rerun never resumes state that other code or params made.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from models.errors import NonFiniteError
from models.training import fit, non_finite
from stages.artifacts import atomic_file, seal, sealed, sha256_bytes, unseal
from stages.common import WORK, log
from stages.distributed import World

META_KEY = "neon-snapshot"
KEEP = 2  # the newest snapshots kept; the older one covers a newest one that turns out corrupted


def work_dir(stage: str, inputs: dict[str, dict], params: dict, code_digest: str, dev: torch.device) -> Path:
    """The stage's snapshot folder for these inputs (`input_ref`s), params and code. The device type is
    part of the key because CPU and CUDA generators have different states."""
    digests = {name: ref["digest"] for name, ref in inputs.items()}
    key = sha256_bytes(json.dumps([digests, params, code_digest, dev.type], sort_keys=True).encode())
    return WORK / stage / key[:20]


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `obj`, its tensors moved into `tensors` under their path in the structure."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{name}/{k}", tensors)] for k, v in obj.items()]}  # optimizer: int keys
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot snapshot a {type(obj).__name__} at {name}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


class Snapshots:
    def __init__(self, folder: Path, stage: str):
        self.dir, self.stage = Path(folder), stage

    def _paths(self) -> list[Path]:
        return sorted(self.dir.glob("step-*.safetensors"))  # zero-padded: name order is step order

    def write(self, state: dict) -> None:
        path = self.dir / f"step-{state['step']:08d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        meta = json.dumps(_encode(state, "", tensors), sort_keys=True)
        with atomic_file(path) as tmp:
            tmp.write_bytes(safetensors.torch.save(tensors, metadata={META_KEY: meta}))
        seal(path)  # the commit point: before it, a kill leaves a file no rerun trusts
        for old in self._paths()[:-KEEP]:
            unseal(old)

    def latest(self) -> dict | None:
        """The newest trusted state (None: start at step 0); snapshots that fail their seal are logged and deleted."""
        for path in reversed(self._paths()):
            if sealed(path):
                state = _load(path)
                log(f"[{self.stage}] resuming from step {state['step']} (snapshot {path})")
                return state
            log(f"[{self.stage}] ignoring snapshot {path}: incomplete or corrupted "
                "(it does not match its sealed digest)")
            unseal(path)
        return None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _load(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return _decode(meta, tensors)


def resumable_fit(stage: str, folder: Path, snapshot_every: int, model: nn.Module, *args,
                  world: World | None = None, **kwargs) -> nn.Module:
    """`models.training.fit` resumed from the newest trusted snapshot in `folder`, writing one every
    `snapshot_every` steps. A NaN/inf (in the loss, a snapshot's weights or the trained model) stops the
    stage naming it and drops the snapshots: a rerun with the same params would only hit it again.

    Under torchrun (`world` of several processes) every process resumes from the same snapshot (process 0
    picks it, dropping corrupted ones, before the others read it) and only process 0 writes snapshots."""
    snaps = Snapshots(folder, stage)
    main = world is None or world.is_main
    try:
        if main:
            resume = snaps.latest()
        if world is not None:
            world.barrier()
        if not main:
            resume = snaps.latest()
        if world is not None and world.size > 1:
            kwargs["parallel"] = world.parallel()
        trained = fit(model, *args, resume=resume, snapshot_every=snapshot_every,
                      on_snapshot=snaps.write if main else _skip, **kwargs)
        if bad := non_finite(trained.state_dict()):
            raise NonFiniteError(f"the trained model's tensor `{bad}` holds NaN or inf; lower the learning rate")
    except NonFiniteError as exc:
        if main:
            snaps.remove()
        raise NonFiniteError(f"stage {stage}: {exc} ({stage}.lr)") from None
    return trained


def _skip(state: dict) -> None:
    """Processes other than 0 take part in gathering a snapshot's state but write nothing."""
