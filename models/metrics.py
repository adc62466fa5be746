"""Sample-quality metrics on features: FID and KID (clean-fid's own functions), precision/recall
(Kynkaanniemi et al. 2019, k-NN balls, k = 5 as in the paper), a bootstrap interval for FID, and
the paired comparison of two models measured on the same seeds."""
from __future__ import annotations

import math

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance

from models.errors import InputError


class MetricInputError(InputError, ValueError):
    """Samples a metric cannot be computed on (wrong shape or dtype, too few, non-finite)."""


def check_images(images: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Generated images must be uint8 (N, *shape) (points: float (N, D)): anything else gives a silent, wrong FID."""
    if len(shape) == 3 and images.dtype != torch.uint8:
        raise MetricInputError(f"{what}: images are {images.dtype}, expected uint8 in [0, 255] (quantise them first)")
    if tuple(images.shape[1:]) != tuple(shape):
        raise MetricInputError(f"{what}: images are {tuple(images.shape[1:])}, the reference data is {tuple(shape)}")


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not np.isfinite(features).all():
        raise MetricInputError("features contain NaN or inf: the generator produced non-finite images")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    if features.shape[1] != mu_ref.shape[0]:
        raise MetricInputError(f"features are {features.shape[1]}-d, the reference statistics {mu_ref.shape[0]}-d")
    if len(features) < 2:
        raise MetricInputError(f"FID needs at least 2 samples, got {len(features)}")
    if len(features) <= features.shape[1]:
        return _fid_few_samples(features, mu_ref, sigma_ref)
    mu, sigma = statistics(features)
    return float(frechet_distance(mu, sigma, mu_ref, sigma_ref))


def _fid_few_samples(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID when there are no more samples than dimensions (300 Inception features are 2048-d).

    The sample covariance is then A^T A with A the n x d centred samples / sqrt(n - 1), and the nonzero
    eigenvalues of sigma @ sigma_ref equal those of the n x n matrix A sigma_ref A^T. So
    tr sqrt(sigma sigma_ref) is exact from an n x n eigen-decomposition, where clean-fid's d x d `sqrtm`
    of a singular product is slow (30 s at d = 2048 on 2 cores) and only approximately right.
    """
    if not np.isfinite(features).all():
        raise MetricInputError("features contain NaN or inf: the generator produced non-finite images")
    x = features.astype(np.float64)
    mu = x.mean(axis=0)
    a = (x - mu) / math.sqrt(len(x) - 1)
    m = a @ sigma_ref @ a.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu - mu_ref
    return float(diff @ diff + np.sum(a * a) + np.trace(sigma_ref) - 2 * tr_sqrt)


def kid(features: np.ndarray, real_features: np.ndarray, seed: int = 0) -> float:
    state = np.random.get_state()
    np.random.seed(seed)  # clean-fid draws its subsets from numpy's global generator
    try:
        return float(kernel_distance(features, real_features, num_subsets=100, max_subset_size=1000))
    finally:
        np.random.set_state(state)


PR_BLOCK_BYTES = 256 * 2 ** 20  # largest distance block precision_recall holds (float64) on the CPU; 4x on CUDA
# Blocks are whole multiples of this many rows, so the BLAS tiles a block's rows as it tiles the whole
# matrix's (its kernels take rows 4 at a time here; 192 is a multiple of 1..64 and of 3, 6, 12, 24) and a
# block's distances equal the dense matrix's rows bit for bit (tests/test_metrics.py checks it).
PR_ROW_QUANTUM = 192


def _cdist(a: torch.Tensor, b: torch.Tensor, mm: bool) -> torch.Tensor:
    """torch.cdist with its mm-or-not choice pinned to the one it makes for the whole matrix (mm when
    either side has more than 25 rows), so a block of rows takes the same arithmetic as the dense rows."""
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist" if mm else "donot_use_mm_for_euclid_dist")


def _block_rows(n_cols: int, block_bytes: int) -> int:
    rows = block_bytes // (8 * max(n_cols, 1))
    return max(PR_ROW_QUANTUM, rows // PR_ROW_QUANTUM * PR_ROW_QUANTUM)


def _kth_radius(x: torch.Tensor, k: int, block_bytes: int = PR_BLOCK_BYTES) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point, a block of rows at a time."""
    rows, mm = _block_rows(len(x), block_bytes), len(x) > 25
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for a in range(0, len(x), rows):
        # The (k+1)-th smallest (+1: the point itself), the value kthvalue gives; topk is ~10x faster
        # here and keeps no full-size index and value copies of the block.
        out[a:a + rows] = _cdist(x[a:a + rows], x, mm).topk(k + 1, dim=1, largest=False).values[:, -1]
    return out


def real_subset(real_features: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` real features drawn at random without replacement (all of them when there are fewer).

    Data files are often sorted by class (the built-in MNIST is), so the first `count` rows would be
    one or two classes; the same seed gives every model the same subset.
    """
    if count >= len(real_features):
        return real_features
    index = np.random.default_rng(seed).choice(len(real_features), size=count, replace=False)
    return real_features[np.sort(index)]


def precision_recall(features: np.ndarray, real_features: np.ndarray, k: int = 5,
                     device: torch.device | str | None = None, block_bytes: int | None = None) -> tuple[float, float]:
    """Precision: share of generated samples inside some real k-NN ball; recall: the reverse.

    Distances are float64 and computed a block of rows at a time (at most `block_bytes`, default
    PR_BLOCK_BYTES on the CPU and 4x that on CUDA), never as dense n x n matrices (20 GB each at
    n = 50,000): memory stays bounded, and on the CPU the result equals the dense computation's.
    `device` (default CPU) is where the distances are computed.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.from_numpy(np.asarray(features, dtype=np.float64)).to(dev)
    r = torch.from_numpy(np.asarray(real_features, dtype=np.float64)).to(dev)
    if min(len(g), len(r)) <= k:
        raise MetricInputError(f"precision/recall with k={k} needs more than {k} samples on each side")
    if block_bytes is None:
        block_bytes = PR_BLOCK_BYTES * (4 if dev.type == "cuda" else 1)
    r_rad, g_rad = _kth_radius(r, k, block_bytes), _kth_radius(g, k, block_bytes)
    inside = torch.empty(len(g), dtype=torch.bool, device=dev)  # generated sample in some real ball
    covered = torch.zeros(len(r), dtype=torch.bool, device=dev)  # real sample in some generated ball
    rows, mm = _block_rows(len(r), block_bytes), len(g) > 25 or len(r) > 25
    for a in range(0, len(g), rows):
        d = _cdist(g[a:a + rows], r, mm)  # (rows, n_real)
        inside[a:a + rows] = (d <= r_rad[None, :]).any(dim=1)
        covered |= (d <= g_rad[a:a + rows, None]).any(dim=0)
    return inside.double().mean().item(), covered.double().mean().item()


def fid_bootstrap(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, rounds: int = 100,
                  seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Bias-corrected percentile interval of FID over resamplings of the generated features.

    Resampling with replacement repeats samples, which pushes FID up; the plain percentile interval
    inherits that bias and can miss the estimate itself. The interval is shifted by the bootstrap's
    own bias estimate (mean of the resampled FIDs minus the FID), so its width is the bootstrap
    spread and it sits around the estimate.
    """
    rng = np.random.default_rng(seed)
    values = [fid(features[rng.integers(0, len(features), len(features))], mu_ref, sigma_ref) for _ in range(rounds)]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    bias = float(np.mean(values)) - fid(features, mu_ref, sigma_ref)
    return float(max(lo - bias, 0.0)), float(hi - bias)


def paired_difference(base_runs: list[float], neon_runs: list[float], level: float = 0.95) -> dict:
    """Paired t interval for the mean of base - neon over seed runs that share their seeds.

    Base and Neon are measured on the same latents in each seed run (common random numbers), so the
    per-run differences are the observations: k runs give k - 1 degrees of freedom. `verdict` is
    `improved` (the interval lies above 0), `worse` (below 0) or `inconclusive`; `runs_needed` is how
    many runs would put an interval of the observed spread clear of 0 (None if the difference is 0).
    """
    from scipy.stats import t as student_t

    d = np.asarray(base_runs, dtype=np.float64) - np.asarray(neon_runs, dtype=np.float64)
    k = len(d)
    if k < 2 or len(base_runs) != len(neon_runs):
        raise MetricInputError(f"a paired comparison needs 2+ seed runs of each model, got {len(base_runs)} "
                               f"and {len(neon_runs)}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    quantile = float(student_t.ppf((1 + level) / 2, k - 1))
    half = quantile * sd / math.sqrt(k)
    verdict = "improved" if mean - half > 0 else "worse" if mean + half < 0 else "inconclusive"
    runs_needed = None
    if mean != 0:
        runs_needed = k
        while float(student_t.ppf((1 + level) / 2, runs_needed - 1)) * sd / math.sqrt(runs_needed) >= abs(mean):
            runs_needed += 1
            if runs_needed > 10_000:
                break
    return {"mean": mean, "sd": sd, "runs": k, "df": k - 1, "level": level, "t": quantile,
            "interval": [mean - half, mean + half], "verdict": verdict, "runs_needed": runs_needed}
