"""Stage `train`: the base generator for the embedded default, trained on the real data.

Skipped (an artifact that says so, written in milliseconds) when `base.checkpoint` names a user's model.
Under torchrun the processes train one model with DDP on slices of each global batch (`models.training.fit`);
process 0 writes the snapshots and the artifact.
"""
from __future__ import annotations

import contextlib

import torch

from models import checkpoint, family as families
from stages import code, curves, distributed, snapshots
from stages.artifacts import artifact, input_ref, work_folder
from stages.common import DATA, MODEL_FILE, TRAIN, device, device_name, load_data, log, progress
from stages.model_config import conditioning_labels, model_config
from stages.params import BaseParams, ModelParams, TrainParams


def run(model_p: ModelParams, train_p: TrainParams, base_p: BaseParams) -> dict | None:
    """The manifest (None on torchrun's processes other than 0)."""
    params = {"model": model_p.model_dump(), "train": train_p.model_dump(), "base.checkpoint": base_p.checkpoint}
    if base_p.checkpoint:
        if distributed.rank() != 0:
            return None
        with artifact(TRAIN, "train", params, inputs={}, device=device_name(device())) as out:
            out.extra["skipped"] = f"base.checkpoint is set ({base_p.checkpoint}): no base training"
            curves.skipped("train", out.extra["skipped"])
        log(f"[train] skipped: base.checkpoint = {base_p.checkpoint}")
        return out.manifest
    distributed.check_split("train", train_p.batch_size, train_p.noise_streams, distributed.size())
    world = distributed.world()
    dev = world.device
    main = world.is_main
    config = model_config(model_p)
    fam = families.get(model_p.family)
    images, labels = load_data()
    labels = conditioning_labels(model_p, labels)
    inputs = {"data": input_ref(DATA)}
    work = snapshots.work_dir("train", inputs,
                              {**params, "train": train_p.model_dump(exclude={"snapshot_every"})},
                              code.digest(__name__), dev)
    # The work folder (snapshots) is removed once the artifact is published, kept if the run fails; process 0
    # holds it and writes the artifact.
    with (work_folder(work) if main else contextlib.nullcontext(work)), \
            (artifact(TRAIN, "train", params, inputs=inputs, device=world.describe(device_name(dev)))
             if main else contextlib.nullcontext()) as out:
        torch.manual_seed(train_p.seed)  # initial weights
        model = fam.build(config).to(dev)
        n_params = sum(t.numel() for t in model.parameters())
        if main:
            split = (f" across {world.size} processes ({train_p.batch_size // world.size} each)"
                     if world.size > 1 else "")
            log(f"[train] {model_p.family} model, {n_params:,} parameters, {train_p.steps} steps x "
                f"{train_p.batch_size} images{split} on {device_name(dev)}; snapshots every {train_p.snapshot_every} "
                f"steps in {work}")
        ema = snapshots.resumable_fit(
            "train", work, train_p.snapshot_every, model, fam.loss(config), images, labels, steps=train_p.steps,
            batch_size=train_p.batch_size, lr=train_p.lr, seed=train_p.seed, ema_decay=train_p.ema_decay,
            label_dropout=model_p.label_dropout, null_label=model_p.label_dim,
            progress=curves.logged("train", progress("train"), work.name) if main else None,
            noise_streams=train_p.noise_streams, world=world, amp=train_p.amp, compile=train_p.compile)
        if not main:
            return None
        checkpoint.save(out.path(MODEL_FILE), ema.state_dict(), model_p.family, config)
        out.extra["training"] = {"images_seen": train_p.steps * train_p.batch_size, "parameters": n_params}
        if world.size > 1:
            out.extra["distributed"] = {"processes": world.size, "backend": world.backend}
    return out.manifest
