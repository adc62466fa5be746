"""Stage `finetune`: self-train a copy of the base on the synthetic set with the family's own loss -> theta_s."""
from __future__ import annotations

import contextlib

import torch

from models import checkpoint
from models.errors import NonFiniteError
from models.training import non_finite
from stages import code, curves, distributed, snapshots
from stages.artifacts import artifact, input_ref, work_folder
from stages.common import BASE, MODEL_FILE, SELFTRAINED, SYNTHETIC, device_name, log, progress
from stages.model_config import load
from stages.params import FinetuneParams, ModelParams
from stages.sample import load_synthetic


def run(p: FinetuneParams, model_p: ModelParams) -> dict | None:
    """The manifest (None on torchrun's processes other than 0, which train with process 0 under DDP on
    slices of each global batch; process 0 writes the snapshots and the artifact)."""
    distributed.check_split("finetune", p.batch_size, p.noise_streams, distributed.size())
    world = distributed.world()
    inputs = {"base": input_ref(BASE), "synthetic": input_ref(SYNTHETIC)}
    dev = world.device
    main = world.is_main
    model, fam, config = load(BASE / MODEL_FILE, model_p)
    if bad := non_finite(model.state_dict()):
        raise NonFiniteError(f"stage finetune: the base checkpoint {BASE / MODEL_FILE} holds NaN or inf in tensor "
                             f"`{bad}`; retrain the base with a lower train.lr or fetch a finite checkpoint")
    images, labels = load_synthetic()
    images = torch.from_numpy(images)
    labels = None if labels is None else torch.from_numpy(labels)
    work = snapshots.work_dir("finetune", inputs,
                              {"finetune": p.model_dump(exclude={"snapshot_every"}), "model": model_p.model_dump()},
                              code.digest(__name__), dev)
    if main:
        split = f" across {world.size} processes ({p.batch_size // world.size} each)" if world.size > 1 else ""
        log(f"[finetune] {p.steps} steps x {p.batch_size} images{split} ({p.steps * p.batch_size / len(images):.2f} "
            f"epochs of |S| = {len(images)}), {p.optimizer} lr {p.lr}, EMA {p.ema_decay} on {device_name(dev)}; "
            f"snapshots every {p.snapshot_every} steps in {work}")
    with (work_folder(work) if main else contextlib.nullcontext(work)), \
            (artifact(SELFTRAINED, "finetune", p.model_dump(), inputs=inputs, device=world.describe(device_name(dev)))
             if main else contextlib.nullcontext()) as out:
        tuned = snapshots.resumable_fit(
            "finetune", work, p.snapshot_every, model.to(dev), fam.loss(config), images, labels, steps=p.steps,
            batch_size=p.batch_size, lr=p.lr, seed=p.seed, ema_decay=p.ema_decay, optimizer=p.optimizer,
            label_dropout=model_p.label_dropout, null_label=model_p.label_dim,
            progress=curves.logged("finetune", progress("finetune"), work.name) if main else None,
            noise_streams=p.noise_streams, world=world, amp=p.amp, compile=p.compile)
        if not main:
            return None
        checkpoint.save(out.path(MODEL_FILE), tuned.state_dict(), model_p.family, config,
                        extra={"base_digest": inputs["base"]["digest"], "synthetic_digest": inputs["synthetic"]["digest"]})
        out.extra["training"] = {"images_seen": p.steps * p.batch_size}
        if world.size > 1:
            out.extra["distributed"] = {"processes": world.size, "backend": world.backend}
    return out.manifest
