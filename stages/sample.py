"""Stage `sample`: the synthetic set S, drawn from the base model with its inference sampler.

Sample i uses seed + i and network batches start at multiples of `batch_size` (shards are whole
batches), so the set is bit-identical for any shard size or number of workers. (A different
`batch_size` changes float rounding inside the network: images then agree within one grey level,
so batch_size is part of the params that key the set.) Shards are written atomically and sealed with
their digest into a work folder keyed by (base digest, params, code digest); a rerun after a kill keeps
the intact ones and draws the rest. The artifact is published only when every shard is there.

Under torchrun (`stages.distributed`) shard i is drawn by process i % N into the same work folder; once every
process is done, process 0 alone publishes the set, byte for byte the set one process draws.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np

from models.sampling import class_labels, generate
from stages import code, distributed
from stages.artifacts import (ArtifactError, artifact, atomic_file, input_ref, recorded_digest, seal, sealed, sha256_bytes,
                              sha256_file, unseal, work_folder)
from stages.common import BASE, MODEL_FILE, SYNTHETIC, WORK, device_name, load_images, log, progress, save_images
from stages.model_config import load
from stages.params import ModelParams, SampleParams, sampler_settings


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:08d}-{stop:08d}.npz"


def work_dir(base_digest: str, params: dict) -> Path:
    """Where a run's shards wait until the set is complete: keyed by the base, the params and the sampling
    code, so a rerun after a sampler fix never resumes from shards the old code drew."""
    key = sha256_bytes(json.dumps([base_digest, params, code.digest(__name__)], sort_keys=True).encode())
    return WORK / "sample" / key[:20]


def _complete(path: Path) -> bool:
    """A shard a rerun may keep: sealed with the digest recorded when it was written. A shard whose
    bytes no longer match is drawn again (a killed run's unsealed file likewise)."""
    state = sealed(path)
    if state is False:
        log(f"[sample] {path} does not match its recorded digest (corrupted): drawing it again")
        unseal(path)
    return bool(state)


def run(p: SampleParams, model_p: ModelParams, step=None) -> dict | None:
    """`step(name, fn, *args)` runs a sub-step (the flow makes each shard a Prefect task). Under torchrun
    each process draws its shards and process 0 publishes the set: the manifest there, None elsewhere."""
    step = step or (lambda name, fn, *args: fn(*args))
    world = distributed.world()
    base = input_ref(BASE)
    dev = world.device
    params = {**p.model_dump(exclude={"sampler"}), "sampler": {model_p.family: sampler_settings(p, model_p).model_dump()}}
    folder = work_dir(base["digest"], params)
    main = world.is_main
    # Process 0 holds the work folder (removed only after the artifact is published) and writes the artifact;
    # the others draw their shards into the folder it holds.
    with (work_folder(folder) if main else contextlib.nullcontext(folder)) as work, \
            (artifact(SYNTHETIC, "sample", params, inputs={"base": base}, device=world.describe(device_name(dev)))
             if main else contextlib.nullcontext()) as out:
        world.barrier()  # process 0 holds the folder before anyone writes into it
        model, fam, config = load(BASE / MODEL_FILE, model_p)
        model = model.to(dev)
        settings = sampler_settings(p, model_p)
        shape = tuple(config["image_shape"])
        ranges = shard_ranges(p.n, p.shard_size)
        mine = ranges[world.rank::world.size]
        kept = {(a, b) for a, b in mine if _complete(work / shard_name(a, b))}  # each shard hashed once
        done = len(kept)
        who = f" (process {world.rank} of {world.size})" if world.size > 1 else ""
        log(f"[sample{who}] {p.n} images in {len(ranges)} shards ({done} already complete in {work}"
            f"{f'; this process draws {len(mine)}' if world.size > 1 else ''}) on {device_name(dev)}, "
            f"{model_p.family} sampler {settings.model_dump()}")
        report = progress("sample" if world.size == 1 else f"sample {world.rank}")
        todo = sum(b - a for a, b in mine)

        def write_shard(start: int, stop: int) -> str:
            path = work / shard_name(start, stop)
            if (start, stop) not in kept:
                labels = class_labels(range(start, stop), model_p.label_dim)
                images = generate(model, fam, settings, shape, list(range(p.seed + start, p.seed + stop)),
                                  p.batch_size, labels=labels, device=dev)
                with atomic_file(path) as tmp:
                    save_images(tmp, images.numpy(), None if labels is None else labels.numpy())
                seal(path)
            if world.size == 1:
                report(stop, p.n)
            else:
                report(sum(b - a for a, b in mine if b <= stop), todo)
            return path.name

        for a, b in mine:
            step(f"shard {a}-{b}", write_shard, a, b)
        world.barrier()  # every process's shards are sealed in the folder
        if not main:
            return None
        for a, b in ranges:
            name = shard_name(a, b)
            if recorded_digest(work / name) is None:
                raise ArtifactError(f"{work / name} is missing or unsealed after every process finished; rerun sample "
                                    "to draw it again")
            shutil.copyfile(work / name, out.path(name))
            if sha256_file(out.path(name)) != recorded_digest(work / name):
                raise ArtifactError(f"{work / name} changed after it was sealed (corrupted); rerun sample to draw it again")
        out.extra["synthetic"] = {"count": p.n, "shape": list(shape), "shards": len(ranges)}
        if world.size > 1:
            out.extra["distributed"] = {"processes": world.size, "backend": world.backend}
    return out.manifest


def load_synthetic() -> tuple[np.ndarray, np.ndarray | None]:
    """The synthetic images and, for a conditional model, the classes they were drawn for."""
    shards = [load_images(path) for path in sorted(SYNTHETIC.glob("shard-*.npz"))]
    labels = None if shards[0][1] is None else np.concatenate([lab for _, lab in shards])
    return np.concatenate([img for img, _ in shards]), labels
