"""Weight-space merge methods behind one interface: (base, other, weight) -> merged state dict.

`neon` is the paper's negative extrapolation away from the self-trained weights.
"""
from __future__ import annotations

from typing import Callable

import torch

from models.errors import InputError

MergeFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
_METHODS: dict[str, MergeFn] = {}


class MergeError(InputError, ValueError):
    """Two checkpoints that cannot be merged (another architecture, a diverged fine-tune)."""


def merge_method(name: str):
    def deco(fn: MergeFn) -> MergeFn:
        _METHODS[name] = fn
        return fn
    return deco


@merge_method("neon")
def neon(base: torch.Tensor, selftrained: torch.Tensor, w: float) -> torch.Tensor:
    """theta_base - w * (theta_s - theta_base), in the form that loses least precision."""
    return base - w * (selftrained - base)


@merge_method("linear")
def linear(base: torch.Tensor, other: torch.Tensor, w: float) -> torch.Tensor:
    """(1 - w) * base + w * other; w < 0 is the same extrapolation as `neon` with -w."""
    return base + w * (other - base)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def merge(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor], w: float,
          method: str = "neon", other_name: str = "self-trained") -> dict[str, torch.Tensor]:
    """Merge tensor by tensor in fp32, cast back to each tensor's dtype.

    Integer buffers, and tensors already non-finite in the base (e.g. -inf attention masks), are
    copied from the base. A tensor that is finite in the base but not in `other` means the other
    model is broken (a diverged fine-tune): refused, naming the tensor and `other_name`.
    """
    try:
        fn = _METHODS[method]
    except KeyError:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(sorted(_METHODS))}") from None
    missing, extra = sorted(set(base) - set(other)), sorted(set(other) - set(base))
    if missing or extra:
        name = (missing or extra)[0]
        where = "self-trained" if missing else "base"
        raise MergeError(f"tensor `{name}` is missing from the {where} checkpoint "
                         f"({len(missing)} missing, {len(extra)} extra): both must come from the same architecture")
    out = {}
    for name, b in base.items():
        o = other[name]
        if b.shape != o.shape or b.dtype != o.dtype:
            raise MergeError(f"tensor `{name}`: base is {tuple(b.shape)} {b.dtype}, self-trained is "
                             f"{tuple(o.shape)} {o.dtype}: both must come from the same architecture")
        if not b.is_floating_point() or not _finite(b):
            out[name] = b.clone()
        elif not _finite(o):
            raise MergeError(f"tensor `{name}` holds NaN/inf in the {other_name} checkpoint but is finite in the base: "
                             "that model is broken (a diverged fine-tune?); rerun it with a lower learning rate")
        else:
            out[name] = fn(b.to(torch.float32), o.to(torch.float32), float(w)).to(b.dtype)
    return out
