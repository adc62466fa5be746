"""Stage `evaluate`: FID of the base and of every merged model against the real data's statistics.

Every model is sampled with the same per-sample seeds (common random numbers), so differences
between models are not sampling noise of the latents. Per-model results are cached by content
(model digest, reference digest, settings) in the work folder, so changing `merge.weights` only
evaluates the new weights.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import frechet_distance
from safetensors.torch import load_file

from models.classifier import FeatureNet, extract
from models.sampling import generate
from stages.artifacts import artifact, atomic_file, input_ref, read_manifest, sha256_bytes, sha256_file, verify
from stages.common import (BASE, EVALUATE, MERGED, MODEL_FILE, REFERENCE, RESULTS, WORK, StageError, device, device_name,
                           save_images,
                           log, progress)
from stages.model_config import load
from stages.params import EvaluateParams, ModelParams, SampleParams


def load_feature_net() -> tuple[FeatureNet, np.ndarray, np.ndarray, str]:
    verify(REFERENCE)
    state = load_file(str(REFERENCE / "classifier.safetensors"))
    manifest = read_manifest(REFERENCE)
    shape = read_manifest(Path(manifest["inputs"]["data"]["path"]))["data"]["shape"]
    net = FeatureNet(shape[0], state["head.weight"].shape[0], state["head.weight"].shape[1])
    net(torch.zeros(1, *shape, dtype=torch.uint8))  # materialise the lazy layer
    net.load_state_dict(state)
    with np.load(REFERENCE / "stats.npz", allow_pickle=False) as z:
        mu, sigma = z["mu"], z["sigma"]
    return net.eval(), mu, sigma, manifest["reference"]["feature_space"]


def fid(features: torch.Tensor, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    f = features.to(torch.float64).numpy()
    if not np.isfinite(f).all():
        raise StageError("generated images gave non-finite features; the model produces NaN images")
    return float(frechet_distance(f.mean(axis=0), np.cov(f, rowvar=False), mu_ref, sigma_ref))


def save_grid(path: Path, images: np.ndarray, grid: int, scale: int = 2) -> None:
    from PIL import Image

    n = min(grid * grid, len(images))
    c, h, w = images.shape[1:]
    canvas = np.zeros((grid * h, grid * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, grid)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def save_plot(path: Path, rows: list[dict], feature_space: str, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot([r["w"] for r in rows], [r["fid"] for r in rows], "o-")
    ax.axhline(rows[0]["fid"], color="grey", ls="--", lw=1, label="base (w = 0)")
    ax.set_xlabel("Neon weight w")
    ax.set_ylabel(f"FID ({feature_space} features, n={n})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(p: EvaluateParams, sample_p: SampleParams, model_p: ModelParams, step=None) -> dict:
    step = step or (lambda name, fn, *args: fn(*args))
    verify(MERGED)
    merged = read_manifest(MERGED)
    inputs = {"base": input_ref(BASE), "merged": input_ref(MERGED), "reference": input_ref(REFERENCE)}
    net, mu_ref, sigma_ref, space = load_feature_net()
    if p.n <= mu_ref.shape[0]:
        raise StageError(f"evaluate.n = {p.n} samples cannot estimate a {mu_ref.shape[0]}-d covariance; "
                         f"set evaluate.n above {mu_ref.shape[0]} (500+ recommended)")
    dev = device()
    candidates = [(0.0, BASE / MODEL_FILE)] + [(w, MERGED / f"w={w:g}.safetensors") for w in merged["params"]["weights"]]
    settings_key = json.dumps([p.model_dump(exclude={"grid"}), sample_p.sampler.model_dump(),
                               inputs["reference"]["digest"]], sort_keys=True)
    cache = WORK / "evaluate"
    cache.mkdir(parents=True, exist_ok=True)

    def evaluate_model(w: float, path: Path) -> dict:
        key = sha256_bytes((sha256_file(path) + settings_key).encode())[:24]
        hit = cache / f"{key}.json"
        if hit.exists() and (cache / f"{key}.npz").exists():
            log(f"[evaluate] w = {w:g}: cached")
            return json.loads(hit.read_text())
        model, fam, config = load(path, model_p)
        images = generate(model.to(dev), fam, fam.sampler_settings(sample_p.sampler.model_dump()),
                          tuple(config["image_shape"]), list(range(p.seed, p.seed + p.n)), p.batch_size,
                          device=dev, progress=progress(f"evaluate w={w:g}"))
        result = {"w": w, "fid": fid(extract(net, images), mu_ref, sigma_ref)}
        with atomic_file(cache / f"{key}.npz") as tmp:
            save_images(tmp, images[: p.grid * p.grid].numpy())
        with atomic_file(hit) as tmp:
            tmp.write_text(json.dumps({**result, "key": key}))
        log(f"[evaluate] w = {w:g}: FID {result['fid']:.3f}")
        return {**result, "key": key}

    with artifact(EVALUATE, "evaluate", {"evaluate": p.model_dump(), "sampler": sample_p.sampler.model_dump()},
                  inputs=inputs, device=device_name(dev)) as out:
        rows = [step(f"evaluate w={w:g}", evaluate_model, w, path) for w, path in candidates]
        best = min(rows, key=lambda r: r["fid"])
        base_fid = rows[0]["fid"]
        metrics = {"feature_space": space, "n": p.n, "fid_base": base_fid,
                   "fid": {f"w={r['w']:g}": r["fid"] for r in rows}, "best_w": best["w"], "best_fid": best["fid"],
                   "relative_change": (best["fid"] - base_fid) / base_fid}
        (out.path("metrics.json")).write_text(json.dumps(metrics, indent=2) + "\n")
        with open(out.path("fid_vs_w.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["w", "fid"])
            writer.writeheader()
            writer.writerows({"w": r["w"], "fid": round(r["fid"], 6)} for r in rows)
        save_plot(out.path("fid_vs_w.png"), rows, space, p.n)
        for name, row in (("grid_base.png", rows[0]), ("grid_best.png", best)):
            with np.load(cache / f"{row['key']}.npz", allow_pickle=False) as z:
                save_grid(out.path(name), z["images"], p.grid)
        out.path("report.md").write_text(report(metrics, rows))
    # DVC's metrics and plots (small, kept in git) mirror the artifact's.
    for name in ("metrics.json", "fid_vs_w.csv"):
        with atomic_file(RESULTS / name) as tmp:
            shutil.copyfile(EVALUATE / name, tmp)
    log(report(metrics, rows))
    return out.manifest


def report(metrics: dict, rows: list[dict]) -> str:
    base = metrics["fid_base"]
    lines = [f"FID ({metrics['feature_space']} features, {metrics['n']} samples per model, lower is better)", "",
             "| model | w | FID | vs base |", "|---|---|---|---|"]
    for r in rows:
        name = "base" if r["w"] == 0 else "neon"
        lines.append(f"| {name} | {r['w']:g} | {r['fid']:.3f} | {100 * (r['fid'] - base) / base:+.1f}% |")
    verdict = (f"best w = {metrics['best_w']:g}: FID {base:.3f} -> {metrics['best_fid']:.3f}"
               if metrics["best_w"] != 0 else f"no w in the sweep beat the base (FID {base:.3f})")
    return "\n".join(lines + ["", verdict, ""])
