"""Stage `evaluate`: how good is each model, how sure are we, and which w is best.

1. Sweep: the base (w = 0) and every w of `merge.weights`, FID/KID/precision/recall in the primary space
   (the classifier's features for images; the raw coordinates, i.e. closed-form FID, for 2D points).
2. Refine: golden-section search for w inside the sweep's best bracket.
Every candidate is merged in memory from the base and the self-trained checkpoint, never written: the
`merge` stage, after this one, writes the model at the chosen w.
3. Confirm: base and best w on `seeds` fresh sample seeds, in every feature space; a bootstrap
   interval for the primary FID. Base and Neon share the seeds of each run (common random numbers),
   so the verdict is a paired t interval over the runs: "improved" only when it lies above zero.
Precision/recall compare equal counts: a fixed random subset of the real features, the same for
every model. Each measurement is cached by everything that changes it: the models' digests, w, the
seed run and sample counts, every evaluate param the measurement reads, the sampler settings, the
reference's digest and the digest of every project module this stage runs (`stages.code`). A rerun
that changes only `merge.weights` measures only the new weights; a code edit measures again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from models import checkpoint, metrics
from models.merge import merge
from models.sampling import class_labels, generate
from stages import code, curves, report
from stages.artifacts import ArtifactError, artifact, atomic_file, input_ref, read_manifest, seal, sealed, sha256_bytes
from stages.common import (BASE, DATA, EVALUATE, MODEL_FILE, REFERENCE, RESULTS, SELFTRAINED, SYNTHETIC,
                           WORK, StageError,
                           device, device_name, load_images, log, progress, save_images)
from stages.model_config import load
from stages.params import EvaluateParams, MergeParams, ModelParams, SampleParams, sampler_settings
from stages.reference import load_spaces
from stages.wsearch import bracket, golden_section, quadratic_argmin

CACHE = WORK / "evaluate"


def _check(p: EvaluateParams, spaces: dict) -> None:
    primary = next(iter(spaces.values()))
    if p.n <= primary.dim:
        raise StageError(f"evaluate.n = {p.n} samples cannot estimate the {primary.dim}-d {primary.name} covariance; "
                         f"set evaluate.n above {primary.dim} (500+ recommended)")
    if p.n <= p.k or (p.inception_n and p.inception_n <= p.k):
        raise StageError(f"precision/recall with k = {p.k} needs more than {p.k} samples: raise evaluate.n and "
                         "evaluate.inception_n (or lower evaluate.k)")
    if p.inception_n and primary.name == "raw":
        raise StageError("Inception features need images; set evaluate.inception_n: 0 for point data")
    if p.inception_n and "inception" not in spaces:
        raise StageError("evaluate.inception_n > 0 needs Inception reference statistics: set reference.inception_n > 0 "
                         "(or evaluate.inception_n: 0)")


def cached(path: Path) -> bool:
    """A cached measurement to reuse: sealed and intact. One that never finished is redone; one whose
    bytes changed after it was written is refused, so no report is built on it."""
    state = sealed(path)
    if state is False:
        raise ArtifactError(f"cached evaluation result {path} does not match the digest recorded when it was "
                            f"written (corrupted); delete it (rm {path}*) and rerun evaluate to recompute it")
    return bool(state)


def run(p: EvaluateParams, sample_p: SampleParams, model_p: ModelParams, merge_p: MergeParams, step=None) -> dict:
    step = step or (lambda name, fn, *args: fn(*args))
    inputs = {"base": input_ref(BASE), "selftrained": input_ref(SELFTRAINED), "reference": input_ref(REFERENCE)}
    spaces = load_spaces()
    _check(p, spaces)
    dev = device()
    template, fam, config = load(BASE / MODEL_FILE, model_p)
    shape = tuple(config["image_shape"])
    primary = next(iter(spaces))  # the space the search for w runs in: classifier (images) or raw (points)
    base_settings = sampler_settings(sample_p, model_p, p.sampler)
    guided = bool(model_p.label_dim) and "guidance" in type(base_settings).model_fields
    g0 = getattr(base_settings, "guidance", 1.0)
    base_state, _ = checkpoint.read(BASE / MODEL_FILE)
    selftrained_state, _ = checkpoint.read(SELFTRAINED / MODEL_FILE)
    grid_ws = list(merge_p.weights)
    # Everything a measurement reads, code included: a fix to a sampler or a metric is never answered
    # from the cache for one model while another is measured with the new code.
    settings_key = json.dumps([model_p.family, model_p.label_dim, base_settings.model_dump(),
                               p.model_dump(include={"n", "seed", "batch_size", "k", "grid"}),
                               inputs["reference"]["digest"], code.digest(__name__)])
    CACHE.mkdir(parents=True, exist_ok=True)

    def state_for(w: float):
        if w == 0:
            return base_state
        return merge(base_state, selftrained_state, w, other_name=str(SELFTRAINED / MODEL_FILE))

    def measure(w: float, seed_run: int, n_by_space: dict[str, int], bootstrap: int = 0, guidance: float = g0) -> dict:
        identity = [inputs["base"]["digest"], inputs["selftrained"]["digest"] if w else None, w]
        key = sha256_bytes(json.dumps([identity, seed_run, n_by_space, bootstrap, guidance, settings_key]).encode())[:24]
        hit = CACHE / f"{key}.json"
        label = f"w = {w:g}" + (f", guidance {guidance:g}" if guided else "")
        if cached(hit) and cached(hit.with_suffix(".npz")):
            log(f"[evaluate] {label}, seed run {seed_run}: cached")
            return json.loads(hit.read_text())
        template.load_state_dict(state_for(w))
        n = max(n_by_space.values())
        first = p.seed + seed_run * p.n
        settings = base_settings.model_copy(update={"guidance": guidance}) if guided else base_settings
        images = generate(template.to(dev), fam, settings, shape, list(range(first, first + n)), p.batch_size,
                          labels=class_labels(range(n), model_p.label_dim), device=dev,
                          progress=progress(f"evaluate {label} seed run {seed_run}"))
        metrics.check_images(images, tuple(read_manifest(DATA)["data"]["shape"]), label)
        result = {"w": w, "guidance": guidance, "seed_run": seed_run, "key": key}
        for name, count in n_by_space.items():
            space = spaces[name]
            feats = space.extract(images[:count])
            result[name] = score(space, feats, p.k, p.seed, dev)
            if bootstrap and name == primary:
                result[name]["fid_interval"] = metrics.fid_bootstrap(feats, space.mu, space.sigma, bootstrap)
        with atomic_file(CACHE / f"{key}.npz") as tmp:
            save_images(tmp, images[: p.grid * p.grid if images.dim() == 4 else len(images)].numpy())
        seal(CACHE / f"{key}.npz")
        with atomic_file(hit) as tmp:
            tmp.write_text(json.dumps(result))
        seal(hit)
        log(f"[evaluate] {label}, seed run {seed_run}: " +
            ", ".join(f"{s} FID {result[s]['fid']:.3f}" for s in n_by_space))
        return result

    clf_only = {primary: p.n}
    with artifact(EVALUATE, "evaluate", {"evaluate": p.model_dump(), "merge.weights": grid_ws,
                                         "sampler": {model_p.family: base_settings.model_dump()}},
                  inputs=inputs, device=device_name(dev)) as out:
        guidances = sorted({g0, *p.guidance}) if guided else [g0]
        sweep = [step(f"sweep w={w:g} g={g:g}", measure, w, 0, clf_only, 0, g) for g in guidances for w in [0.0] + grid_ws]
        refined = []
        if len(guidances) > 1:  # joint search: quadratic surface through the (w, guidance) grid
            w_star, g_star = quadratic_argmin([(r["w"], r["guidance"], r[primary]["fid"]) for r in sweep])
            if (round(w_star, 4), round(g_star, 4)) not in {(r["w"], r["guidance"]) for r in sweep}:
                refined.append(step("refine (w, g)", measure, round(w_star, 4), 0, clf_only, 0, round(g_star, 4)))
        else:
            lo, hi, _ = bracket([(r["w"], r[primary]["fid"]) for r in sweep])

            def objective(w: float) -> float:
                refined.append(step(f"refine w={w:.4g}", measure, round(w, 4), 0, clf_only))
                return refined[-1][primary]["fid"]

            golden_section(objective, lo, hi, p.refine)
        curve = sorted(sweep + refined, key=lambda r: (r["guidance"], r["w"]))
        best = min(curve, key=lambda r: r[primary]["fid"])
        best_base = min((r for r in curve if r["w"] == 0), key=lambda r: r[primary]["fid"])
        best_w = best["w"]
        spaces_n = {primary: p.n, **({"inception": p.inception_n} if p.inception_n and primary != "inception" else {})}
        confirm = {label: [step(f"confirm {label} seed run {k}", measure, r["w"], k, spaces_n,
                                p.bootstrap if k == 1 else 0, r["guidance"])
                           for k in range(1, p.seeds + 1)]
                   for label, r in (("base", best_base), ("neon", best))}
        summary = summarise(confirm, spaces_n)
        result = {"feature_spaces": {name: {"dim": spaces[name].dim, "n_generated": n,
                                            "n_real": int(len(spaces[name].real))} for name, n in spaces_n.items()},
                  "best_w": best_w, "best_guidance": best["guidance"], "base_guidance": best_base["guidance"],
                  "conditional": guided, "family": model_p.family, "primary_space": primary,
                  "best_at_sweep_edge": best_w in (min(grid_ws + [0.0]), max(grid_ws)),
                  "sweep": [{"w": r["w"], "guidance": r["guidance"], "stage": "sweep" if r in sweep else "refine",
                             **r[primary]} for r in curve],
                  "confirm": summary, "seeds": p.seeds}
        grids = {label: load_images(CACHE / f"{confirm[label][0]['key']}.npz")[0] for label in confirm}
        measured = ([("sweep", r) for r in sweep] + [("refine", r) for r in refined]
                    + [(f"confirm {label}", r) for label, runs in confirm.items() for r in runs])
        report.write(out, result, grids, p.grid, lineage=_lineage_summary(inputs), measurements=tidy(measured),
                     finetune_curve={name: curves.read(curves.folder("finetune"), name) for name in curves.FIGURES})
    for name in ("metrics.json", "fid_vs_w.csv", "measurements.csv"):  # DVC's metrics and plots (small, in git)
        with atomic_file(RESULTS / name) as tmp:
            shutil.copyfile(EVALUATE / name, tmp)
    log((EVALUATE / "report.md").read_text())
    return out.manifest


def score(space, feats: np.ndarray, k: int, seed: int, dev=None) -> dict:
    """FID, KID and precision/recall of generated features in one space (the k-NN distances on `dev`)."""
    if len(space.real):
        real = metrics.real_subset(space.real, len(feats), seed)  # equal counts, every class, same for every model
        prec, rec = metrics.precision_recall(feats, real, k, device=dev)
        kid = metrics.kid(feats, space.real)
    else:  # imported statistics (reference.stats) carry no real features to compare samples with
        prec = rec = kid = float("nan")
    return {"n": len(feats), "fid": metrics.fid(feats, space.mu, space.sigma), "kid": kid,
            "precision": prec, "recall": rec}


MEASUREMENT_COLUMNS = ["stage", "w", "guidance", "seed_run", "space", "n", "fid", "kid", "precision", "recall"]


def tidy(measured: list[tuple[str, dict]]):
    """Every measurement as one long-format table: a row per (stage, w, guidance, seed run, feature space)."""
    import pandas as pd

    rows = [{"stage": stage, "w": r["w"], "guidance": r["guidance"], "seed_run": r["seed_run"], "space": space,
             **{m: r[space][m] for m in ("n", "fid", "kid", "precision", "recall")}}
            for stage, r in measured for space in r if isinstance(r[space], dict)]
    return pd.DataFrame(rows, columns=MEASUREMENT_COLUMNS)


def summarise(confirm: dict[str, list[dict]], spaces_n: dict[str, int]) -> dict:
    out = {}
    for space in spaces_n:
        per = {}
        for label, runs in confirm.items():
            values = [r[space]["fid"] for r in runs]
            per[label] = {"fid_mean": float(np.mean(values)), "fid_std": float(np.std(values, ddof=1)),
                          "fid_runs": values,
                          **{m: float(np.mean([r[space][m] for r in runs])) for m in ("kid", "precision", "recall")}}
            if "fid_interval" in runs[0][space]:
                per[label]["fid_interval_seed1"] = runs[0][space]["fid_interval"]
        paired = metrics.paired_difference(per["base"]["fid_runs"], per["neon"]["fid_runs"])
        per["gain"] = paired
        per["relative_gain"] = paired["mean"] / per["base"]["fid_mean"] if per["base"]["fid_mean"] else 0.0
        per["improved"] = paired["verdict"] == "improved"
        out[space] = per
    return out


def _lineage_summary(inputs: dict) -> list[tuple[str, str]]:
    base = read_manifest(BASE)
    return [("base checkpoint", f"{base['checkpoint']['source']} (sha256 {base['checkpoint']['sha256'][:16]}…)"),
            ("synthetic set", f"artifacts/synthetic (digest {read_manifest(SYNTHETIC)['digest'][:16]}…)"),
            ("self-trained", f"artifacts/selftrained (digest {inputs['selftrained']['digest'][:16]}…)"),
            ("reference", f"artifacts/reference (digest {inputs['reference']['digest'][:16]}…)"),
            ("code", f"{base['code']['git_commit']}{' (dirty)' if base['code']['dirty'] else ''}")]
