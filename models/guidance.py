"""Classifier-free guidance, shared by the samplers of conditional families."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (x, conditioning (noise level or time), labels or None) -> prediction; None means "no label"
Net = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def null_label(model: nn.Module) -> int | None:
    """The label index that means "no label" (the class embedding's last row, `label_dim`), or None when
    the model has no such row (then the unconditional pass must be asked with labels=None).

    The U-Net families keep `label_dim` on their inner `.net`; the diffusers wrapper on itself.
    """
    for m in (model, getattr(model, "net", None)):
        dim = getattr(m, "label_dim", None)
        if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
            return dim
    return None


def batched_default(x: torch.Tensor) -> bool:
    """Whether `guided` evaluates cond and uncond in one forward pass on a doubled batch.

    Only on CUDA. On the CPU the doubled batch is not bit-identical to two passes for this project's
    models: measured (torch 2.14, x86-64, 1 and 2 threads) on edm, flow, consistency and diffusers
    networks, the predictions agree bit for bit at some batch sizes (4, 8, 16, 64, 100, 250) and differ
    in the last bits (up to 2e-6) at others (1, 2, 3, 5, 10, 125): the CPU kernels block and reduce
    differently at another batch size. CPU artifacts must keep their bytes, so the CPU keeps two
    passes; it would gain little anyway, being compute-bound, where the GPU gains by halving the
    kernel launches and filling the device.
    """
    return x.device.type == "cuda"


def guided(model: Net, x: torch.Tensor, cond: torch.Tensor, labels: torch.Tensor | None, guidance: float,
           batched: bool | None = None, null: int | None = None) -> torch.Tensor:
    """uncond + guidance * (cond - uncond) in float64; one network call when there is nothing to guide.

    `model(x, cond, labels)` evaluates the network at the current state x with conditioning `cond`
    (one value per sample). With guidance, the conditional and unconditional predictions come from one
    forward pass on the doubled batch (x twice, labels then `null` labels) when `batched` (default:
    `batched_default(x)`, i.e. on CUDA) and the model has a null label (`null`, default
    `null_label(model)`); else from two passes, the unconditional one with labels=None.
    """
    if labels is None or guidance == 1.0:
        return model(x, cond, labels).to(torch.float64)
    if batched is None:
        batched = batched_default(x)
    if null is None and batched:
        null = null_label(model) if isinstance(model, nn.Module) else None
    if batched and null is not None:
        n = x.shape[0]
        both = model(torch.cat([x, x]), torch.cat([cond, cond]) if cond.dim() else cond,
                     torch.cat([labels, torch.full_like(labels, null)])).to(torch.float64)
        cond_out, uncond = both[:n], both[n:]
    else:
        cond_out = model(x, cond, labels).to(torch.float64)
        uncond = model(x, cond, None).to(torch.float64)
    return uncond + guidance * (cond_out - uncond)
