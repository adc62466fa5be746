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
