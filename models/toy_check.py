"""The paper's toy check (NEON.md) run end to end in memory: base, synthetic set, self-training,
the w sweep with closed-form FID, the measured gradient alignment that predicts the sign of w, and
the real risk along the merge that the alignment stands for.

Used by the fast tests and by bench/reproduce.py; the same families run through the full pipeline
with `data.source: toy2d`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models import family as families
from models.merge import merge
from models.metrics import fid
from models.toy_target import TOY_COV, TOY_MEAN, toy_points
from models.training import fit

POPULATION_N = 100_000  # fresh real (and synthetic) points for the population gradients


@dataclass(frozen=True)
class ToyRecipe:
    family: str  # toy_diffusion | toy_ar
    real_n: int  # real training points
    base_steps: int  # full-batch steps unless base_batch is set
    base_lr: float
    synthetic_n: int  # |S|
    tune_steps: int
    tune_batch: int
    tune_lr: float
    eval_settings: dict  # the sampler at evaluation
    eval_n: int  # samples per closed-form FID


RECIPES = {  # NEON.md's settings for each toy
    "toy_diffusion": ToyRecipe("toy_diffusion", 1000, 10_000, 1e-4, 1000, 50, 1000, 1e-5, {"zeta": 1.0}, 100_000),
    "toy_ar": ToyRecipe("toy_ar", 100, 1000, 5e-4, 100_000, 50 * 49, 2048, 1e-4, {"tau": 1.0}, 50_000),
}


def draw(model, fam, settings, n: int, seed: int) -> torch.Tensor:
    """n samples; one generator for the whole set (per-sample seeds would cost more than the toy itself)."""
    gen = torch.Generator().manual_seed(seed)
    noise = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    return fam.sample(model.eval(), noise((n, 2)), settings, None, noise)


def closed_form_fid(points: torch.Tensor) -> float:
    """The Frechet distance between the samples' Gaussian fit and the target: exact for a Gaussian target."""
    return fid(points.double().numpy(), TOY_MEAN, TOY_COV)


def run(family: str, sampler: dict, weights: list[float], seed: int = 0, recipe: ToyRecipe | None = None,
        options: dict | None = None) -> dict:
    """Base -> S (with `sampler`) -> theta_s -> closed-form FID at every w (evaluated with the recipe's sampler).

    `options`: the family's Config options that differ from its defaults (e.g. {"time_input": "consistent"})."""
    r = recipe or RECIPES[family]
    fam = families.get(family)
    config = {**fam.Config(**(options or {})).model_dump(), "image_shape": [2], "label_dim": 0}
    real = toy_points(r.real_n, seed)
    torch.manual_seed(seed)
    base = fam.build(config)
    loss = fam.loss(config)
    base = fit(base, loss, real, None, steps=r.base_steps, batch_size=r.real_n, lr=r.base_lr, seed=seed)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    synthetic = draw(base, fam, fam.Settings(**sampler), r.synthetic_n, seed + 1)
    model = fam.build(config)
    model.load_state_dict(base_state)
    tuned = fit(model, loss, synthetic, None, steps=r.tune_steps, batch_size=min(r.tune_batch, r.synthetic_n),
                lr=r.tune_lr, seed=seed + 2)
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    eval_settings = fam.Settings(**{**sampler, **r.eval_settings})
    fids = {}
    for w in weights:
        model.load_state_dict(merge(base_state, tuned_state, w))
        fids[w] = closed_form_fid(draw(model, fam, eval_settings, r.eval_n, seed + 3))
    best = min(fids, key=fids.get)
    population = toy_points(POPULATION_N, seed + 4)
    risk = real_risk(model, loss, population, base_state, tuned_state, [-RISK_STEP, RISK_STEP, 0.0, best], seed + 7)
    model.load_state_dict(base_state)
    return {"fids": fids, "best_w": best, "base_fid": fids.get(0.0), "best_fid": fids[best],
            "alignment": alignment(model, loss, population,
                                   draw(model, fam, fam.Settings(**sampler), POPULATION_N, seed + 5), seed + 6),
            "risk_slope": (risk[RISK_STEP] - risk[-RISK_STEP]) / (2 * RISK_STEP),
            "risk_change_at_best": risk[best] / risk[0.0] - 1}


RISK_STEP = 0.1  # w step of the central difference for the real risk's slope


@torch.no_grad()
def real_risk(model, loss, population: torch.Tensor, base_state: dict, tuned_state: dict, weights: list[float],
              seed: int, batch: int = 2048, draws: int = 4) -> dict:
    """The real-data training loss of the merged model at each w, the same (t, noise) draws at every w.

    The direct measure of what `alignment` predicts: the theory says Neon lowers this risk, at first
    order by w * lr * <g_real, P g_s>; shared draws leave only the change with w, not the loss's own noise.
    """
    out = {}
    for w in weights:
        model.load_state_dict(merge(base_state, tuned_state, w))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            total = sum(float(loss(model, population[i:i + batch], None, gen)) * len(population[i:i + batch])
                        for _ in range(draws) for i in range(0, len(population), batch))
        out[w] = total / (draws * len(population))
    return out


def _gradients(model, loss, points: torch.Tensor, gen: torch.Generator, batch: int, draws: int):
    """Per-batch gradients of the loss over `points` (each batch `draws` times: the loss may be noisy)."""
    params = [p for p in model.parameters()]
    for _ in range(draws):
        for start in range(0, len(points), batch):
            model.zero_grad()
            loss(model, points[start:start + batch], None, gen).backward()
            yield [p.grad.detach().clone() for p in params]


def alignment(model, loss, population: torch.Tensor, synthetic: torch.Tensor, seed: int,
              batch: int = 2048, draws: int = 16, beta2: float = 0.999) -> float:
    """The P-weighted cosine between the real and synthetic gradients at theta_r, as in the paper's toy.

    P = diag(1 / (sqrt(v) + eps)) with v Adam's second-moment estimate over population batches.
    Moving by w * (theta_r - theta_s) ~ w * lr * P g_s changes the real risk by w * lr * <g_real, P g_s>:
    negative means extrapolation (w > 0) helps, positive means plain self-training (w < 0) does.
    """
    gen = torch.Generator().manual_seed(seed)
    g_real, v, steps = None, None, 0
    for g in _gradients(model, loss, population, gen, batch, draws):
        g_real = g if g_real is None else [a + b for a, b in zip(g_real, g)]
        v = [gi * gi * (1 - beta2) for gi in g] if v is None else [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        steps += 1
    precond = [1 / ((vi / (1 - beta2 ** steps)).sqrt() + 1e-8) for vi in v]
    g_syn = None
    for g in _gradients(model, loss, synthetic, gen, batch, draws):
        g_syn = g if g_syn is None else [a + b for a, b in zip(g_syn, g)]

    def dot(a, b):
        return float(sum((x * p * y).sum() for x, p, y in zip(a, precond, b)))
    return dot(g_real, g_syn) / (dot(g_real, g_real) * dot(g_syn, g_syn)) ** 0.5
