"""Finding w: golden-section refinement inside the bracket the coarse sweep found."""
from __future__ import annotations

from typing import Callable

INV_PHI = (5 ** 0.5 - 1) / 2  # 0.618...


def bracket(points: list[tuple[float, float]]) -> tuple[float, float, bool]:
    """(low, high, at_edge) around the best (w, value) of a sweep; at_edge: the optimum may lie outside."""
    pts = sorted(points)
    i = min(range(len(pts)), key=lambda j: pts[j][1])
    lo = pts[max(i - 1, 0)][0]
    hi = pts[min(i + 1, len(pts) - 1)][0]
    return lo, hi, i in (0, len(pts) - 1)


def golden_section(f: Callable[[float], float], a: float, b: float, evals: int) -> list[tuple[float, float]]:
    """Minimise a unimodal f on [a, b] with `evals` evaluations; return every (w, f(w)) evaluated."""
    seen: list[tuple[float, float]] = []
    if evals <= 0 or b <= a:
        return seen

    def ev(w: float) -> float:
        value = f(w)
        seen.append((w, value))
        return value

    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc = ev(c)
    if evals == 1:
        return seen
    fd = ev(d)
    for _ in range(evals - 2):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = ev(c)
        else:
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = ev(d)
    return seen


def quadratic_argmin(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(w, g) minimising a quadratic surface fitted by least squares to (w, g, value) points, within
    their bounding box: the paper's joint search over w and the guidance scale."""
    import numpy as np

    pts = np.asarray(points, dtype=np.float64)
    w, g, v = pts[:, 0], pts[:, 1], pts[:, 2]
    if len(pts) < 6:
        best = int(np.argmin(v))
        return float(w[best]), float(g[best])
    design = np.stack([np.ones_like(w), w, g, w * w, g * g, w * g], axis=1)
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    ww, gg = np.meshgrid(np.linspace(w.min(), w.max(), 101), np.linspace(g.min(), g.max(), 101))
    surface = coef[0] + coef[1] * ww + coef[2] * gg + coef[3] * ww ** 2 + coef[4] * gg ** 2 + coef[5] * ww * gg
    i = np.unravel_index(np.argmin(surface), surface.shape)
    return float(ww[i]), float(gg[i])
