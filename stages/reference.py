"""Stage `reference`: the FID feature space (a classifier trained on the real data) and the real statistics."""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from models.classifier import accuracy, extract, train_classifier
from stages.artifacts import artifact, input_ref
from stages.common import DATA, REFERENCE, load_data, log, progress
from stages.params import ReferenceParams

FEATURE_SPACE = "classifier"  # penultimate layer of a CNN trained on the real data (see README)


def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.to(torch.float64).numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def run(p: ReferenceParams) -> dict:
    images, labels = load_data()
    if labels is None:
        raise ValueError("the classifier feature space needs labelled real data")
    with artifact(REFERENCE, "reference", p.model_dump(), inputs={"data": input_ref(DATA)}) as out:
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(p.seed))
        held_out, fit_idx = perm[: len(images) // 10], perm[len(images) // 10:]
        net = train_classifier(images[fit_idx], labels[fit_idx], p.steps, p.batch_size, p.lr, p.seed,
                               progress("reference: classifier"))
        acc = accuracy(net, images[held_out], labels[held_out])
        mu, sigma = statistics(extract(net, images))
        save_file(net.state_dict(), str(out.path("classifier.safetensors")))
        with open(out.path("stats.npz"), "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        out.extra["reference"] = {"feature_space": FEATURE_SPACE, "feature_dim": int(mu.shape[0]),
                                  "count": int(len(images)), "held_out_accuracy": round(acc, 4)}
    log(f"[reference] feature space `{FEATURE_SPACE}` ({mu.shape[0]}-d), held-out accuracy {acc:.3f}, "
        f"statistics over {len(images)} real images")
    return out.manifest
