"""Weight-space merge methods behind one interface: (base, other, weight) -> merged weights.

`neon` is the paper's negative extrapolation away from the self-trained weights.

Two drivers share the registered methods and one set of rules:
- `merge`: state dicts in memory (torch), one weight; the evaluation uses it.
- `merge_files`: safetensors files streamed in one pass for any number of weights: tensor by tensor,
  in chunks of a bounded number of elements, from memory-mapped inputs straight into each output
  file. It runs on numpy and never imports torch (whose import alone costs seconds and ~280 MB).

Both compute in fp32 and cast back to each tensor's dtype, with the same elementwise operations, so
for the same weight they give bit-identical tensors.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models import checkpoint as ckpt
from models.errors import InputError

# fn(base, other, w, *, delta=None, out=None) -> merged, all fp32, torch tensors or numpy arrays alike.
# `delta` (other - base), when given, is shared by every weight of a chunk; `out` receives the result.
MergeFn = Callable[..., Any]
_METHODS: dict[str, MergeFn] = {}

# Elements per chunk of `merge_files` (1 MiB of fp32): its scratch, a few chunks, stays in the CPU's caches.
DEFAULT_CHUNK = 1 << 18
# Outputs of more bytes than this in all are written streaming (`writeback="auto"`; see merge_files).
STREAM_OVER = 1 << 30


class MergeError(InputError, ValueError):
    """Two checkpoints that cannot be merged (another architecture, a diverged fine-tune)."""


def merge_method(name: str):
    def deco(fn: MergeFn) -> MergeFn:
        _METHODS[name] = fn
        return fn
    return deco


def _xp(x: Any) -> Any:
    """The array module of `x`: torch for tensors, numpy for arrays (same `subtract`/`multiply`/`add`)."""
    return sys.modules["torch"] if type(x).__module__.startswith("torch") else np


@merge_method("neon")
def neon(base: Any, selftrained: Any, w: float, *, delta: Any = None, out: Any = None) -> Any:
    """theta_base - w * (theta_s - theta_base), in the form that loses least precision."""
    xp = _xp(base)
    d = xp.subtract(selftrained, base) if delta is None else delta
    t = xp.multiply(d, w, out=out)
    return xp.subtract(base, t, out=t)


@merge_method("linear")
def linear(base: Any, other: Any, w: float, *, delta: Any = None, out: Any = None) -> Any:
    """(1 - w) * base + w * other; w < 0 is the same extrapolation as `neon` with -w."""
    xp = _xp(base)
    d = xp.subtract(other, base) if delta is None else delta
    t = xp.multiply(d, w, out=out)
    return xp.add(base, t, out=t)


# ---------------------------------------------------------------------------------------------------
# the rules both drivers apply
# ---------------------------------------------------------------------------------------------------

def _method(method: str) -> MergeFn:
    try:
        return _METHODS[method]
    except KeyError:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(sorted(_METHODS))}") from None


def _check_architectures(base: Mapping[str, tuple[tuple[int, ...], str]],
                         other: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Both sides {name: (shape, dtype name)}: refuse naming the first tensor that is missing, extra,
    or of another shape or dtype."""
    missing, extra = sorted(set(base) - set(other)), sorted(set(other) - set(base))
    if missing or extra:
        name = (missing or extra)[0]
        where = "self-trained" if missing else "base"
        raise MergeError(f"tensor `{name}` is missing from the {where} checkpoint "
                         f"({len(missing)} missing, {len(extra)} extra): both must come from the same architecture")
    for name, (shape, dtype) in base.items():
        o_shape, o_dtype = other[name]
        if shape != o_shape or dtype != o_dtype:
            raise MergeError(f"tensor `{name}`: base is {shape} {dtype}, self-trained is "
                             f"{o_shape} {o_dtype}: both must come from the same architecture")


def _broken(name: str, other_name: str) -> MergeError:
    return MergeError(f"tensor `{name}` holds NaN/inf in the {other_name} checkpoint but is finite in the base: "
                      "that model is broken (a diverged fine-tune?); rerun it with a lower learning rate")


def merge(base: dict[str, Any], other: dict[str, Any], w: float,
          method: str = "neon", other_name: str = "self-trained") -> dict[str, Any]:
    """Merge tensor by tensor in fp32, cast back to each tensor's dtype.

    Integer buffers, and tensors already non-finite in the base (e.g. -inf attention masks), are
    copied from the base. A tensor that is finite in the base but not in `other` means the other
    model is broken (a diverged fine-tune): refused, naming the tensor and `other_name`.
    """
    import torch

    def finite(t: torch.Tensor) -> bool:  # torch has no isfinite for FP8: test its exact fp32 values
        native = t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        return bool(torch.isfinite(t if native else t.float()).all())

    fn = _method(method)
    _check_architectures({k: (tuple(v.shape), str(v.dtype)) for k, v in base.items()},
                         {k: (tuple(v.shape), str(v.dtype)) for k, v in other.items()})
    out = {}
    for name, b in base.items():
        o = other[name]
        if not b.is_floating_point() or not finite(b):
            out[name] = b.clone()
        elif not finite(o):
            raise _broken(name, other_name)
        else:
            out[name] = fn(b.to(torch.float32), o.to(torch.float32), float(w)).to(b.dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------

class _Codec:
    """fp32 <-> one float dtype's raw storage, on numpy chunks, rounding exactly as torch's `.to` does."""

    def __init__(self, dtype: ckpt.DType):
        self.dtype = dtype

    def decode(self, raw: np.ndarray, buf: np.ndarray) -> np.ndarray:
        name = self.dtype.name
        if name == "F32":
            return raw  # zero-copy
        if name in ("F16", "F64"):
            np.copyto(buf, raw, casting="same_kind")  # f16 -> f32 exact; f64 -> f32 round to nearest even
        elif name == "BF16":
            u = buf.view(np.uint32)
            np.copyto(u, raw)
            np.left_shift(u, 16, out=u)
        else:  # FP8 variants: numpy has no such types (a copy: torch wants writable memory)
            import torch
            np.copyto(buf, torch.from_numpy(raw.copy()).view(getattr(torch, self.dtype.torch_name)).float().numpy())
        return buf

    def encode(self, r: np.ndarray, raw_buf: np.ndarray, tmp_u32: np.ndarray) -> np.ndarray:
        name = self.dtype.name
        if name == "F32":
            return r
        out = raw_buf.view(self.dtype.storage)[:r.size]
        if name in ("F16", "F64"):
            np.copyto(out, r, casting="same_kind")
        elif name == "BF16":  # c10::BFloat16's round to nearest even: (u + 0x7fff + ((u >> 16) & 1)) >> 16
            u = r.view(np.uint32)
            t = tmp_u32[:r.size]
            np.right_shift(u, 16, out=t)
            np.bitwise_and(t, 1, out=t)
            np.add(t, 0x7FFF, out=t)
            np.add(t, u, out=t)
            np.right_shift(t, 16, out=t)
            np.copyto(out, t, casting="unsafe")
            nan = np.isnan(r)
            if nan.any():
                out[nan] = 0x7FC0
        else:
            import torch
            out[:] = torch.from_numpy(r).to(getattr(torch, self.dtype.torch_name)).view(torch.uint8).numpy()
        return out


class _Streamer:
    """Runs one registered method over chunks of each tensor, for every target weight at once."""

    def __init__(self, fn: MergeFn, weights: list[float], writers: list[ckpt.CheckpointWriter], chunk: int,
                 other_name: str):
        self.fn, self.weights, self.writers, self.chunk, self.other_name = fn, weights, writers, chunk, other_name
        self.b32, self.o32, self.delta, self.result = (np.empty(chunk, np.float32) for _ in range(4))
        self.finite = np.empty(chunk, np.bool_)
        self.tmp_u32 = np.empty(chunk, np.uint32)
        self.raw = np.empty(chunk * 8, np.uint8)  # encoded output of any float dtype up to 8 bytes

    def _all_finite(self, x: np.ndarray) -> bool:
        f = self.finite[:x.size]
        np.isfinite(x, out=f)
        return bool(f.all())

    def copy(self, name: str, raw: np.ndarray) -> None:
        step = max(self.chunk, (64 << 20) // max(1, raw.itemsize))  # raw copies need no scratch: bigger pieces
        for s in range(0, raw.size, step):
            piece = raw[s:s + step]
            for writer in self.writers:
                writer.write(name, piece, s)

    def tensor(self, name: str, base: ckpt.CheckpointReader, other: ckpt.CheckpointReader) -> None:
        info = base.tensors[name]
        base.prefetch(name)
        b_raw = base.array(name).reshape(-1)
        if not info.dtype.is_float:
            return self.copy(name, b_raw)  # integer/bool buffers (and complex): the base's, as `merge` does
        other.prefetch(name)
        o_raw = other.array(name).reshape(-1)
        codec = _Codec(info.dtype)
        other_broken = False
        for s in range(0, b_raw.size, self.chunk):
            e = min(b_raw.size, s + self.chunk)
            m = e - s
            b = codec.decode(b_raw[s:e], self.b32[:m])
            if other_broken:  # the verdict now hangs only on whether the base is finite everywhere
                if not self._all_finite(b):
                    return self.copy(name, b_raw)
                continue
            o = codec.decode(o_raw[s:e], self.o32[:m])
            d = np.subtract(o, b, out=self.delta[:m])
            if not self._all_finite(d):  # rare: find out which side (an overflow of finite values is neither)
                if not self._all_finite(b):
                    return self.copy(name, b_raw)  # overwrites the chunks merged so far
                if not self._all_finite(o):
                    other_broken = True
                    continue
            for w, writer in zip(self.weights, self.writers):
                r = self.fn(b, o, w, delta=d, out=self.result[:m])
                writer.write(name, codec.encode(r, self.raw, self.tmp_u32), s)
        if other_broken:
            raise _broken(name, self.other_name)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def merge_files(base_path: str | os.PathLike, other_path: str | os.PathLike,
                targets: Mapping[float, str | os.PathLike], *, method: str = "neon", other_name: str | None = None,
                family: str | None = None, config: dict[str, Any] | None = None,
                extra: Mapping[str, str] | None = None,
                max_shard_size: int | None = ckpt.DEFAULT_MAX_SHARD_SIZE, chunk: int = DEFAULT_CHUNK,
                writeback: str = "auto") -> dict[float, list[Path]]:
    """Merge two safetensors checkpoints (files or shard indexes) for every weight in `targets`
    ({w: output path}) in ONE pass over the inputs, with the rules and results of `merge`.

    Each output gets the metadata `checkpoint.save` writes: `family`/`config` (by default the base's
    own) plus `extra` and `neon_w` = repr(w); for the same tensors it is byte-identical to
    `checkpoint.save(path, merge(...), ...)`. An output over `max_shard_size` bytes is written as
    Hugging Face shards plus `<path>.index.json` (see `checkpoint.CheckpointWriter`). Peak memory is
    a few `chunk`-element fp32 buffers, whatever the model's size. Outputs are written in place:
    the caller makes them atomic by passing temporary paths; on an error they are deleted.

    `writeback`: "cache" writes through the page cache and leaves writeback to the kernel; "stream"
    hands each 8 MB to writeback as it is written and drops it from the cache once on disk (several
    GB of plain writes get throttled by the kernel's dirty-page limits and evict the inputs from the
    cache; see `checkpoint.SafetensorsWriter`); "auto" streams when the outputs total more than
    STREAM_OVER bytes. Neither fsyncs. Returns {w: paths written}.
    """
    fn = _method(method)
    other_name = other_name or str(other_path)
    if chunk < 1:
        raise ValueError("chunk must be at least 1 element")
    if writeback not in ("auto", "stream", "cache"):
        raise ValueError(f"writeback must be 'auto', 'stream' or 'cache', not {writeback!r}")
    with ckpt.open_checkpoint(base_path) as base, ckpt.open_checkpoint(other_path) as other:
        _check_architectures({n: (i.shape, str(i.dtype)) for n, i in base.tensors.items()},
                             {n: (i.shape, str(i.dtype)) for n, i in other.tensors.items()})
        inputs = [info.path for info in (*base.tensors.values(), *other.tensors.values())]
        for w, path in targets.items():
            if any(_same_file(Path(path), p) for p in set(inputs)):
                raise MergeError(f"the output for w = {w:g} ({path}) is one of the inputs: write to another path")
        specs = {name: (info.dtype, info.shape) for name, info in base.tensors.items()}
        total = len(targets) * sum(info.nbytes for info in base.tensors.values())
        stream = writeback == "stream" or (writeback == "auto" and total > STREAM_OVER)
        base_meta = base.meta

        def metadata(w: float) -> dict[str, str]:
            fields = {**(extra or {}), "neon_w": repr(w)}
            if family is not None:
                return ckpt.metadata_for(family, config or {}, fields)
            return {ckpt.METADATA_KEY: json.dumps({**base_meta, **fields}, sort_keys=True)}

        writers: dict[float, ckpt.CheckpointWriter] = {}
        try:
            for w, path in targets.items():
                writers[float(w)] = ckpt.open_writer(path, specs, metadata(float(w)), max_shard_size, stream)
            if writers:
                streamer = _Streamer(fn, list(writers), list(writers.values()), chunk, other_name)
                with np.errstate(all="ignore"):  # -inf - -inf in a mask is expected: such tensors are copied
                    for name in next(iter(writers.values())).order:
                        streamer.tensor(name, base, other)
                        base.release(name)
                        other.release(name)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
                for p in writer.paths:
                    p.unlink(missing_ok=True)
            raise
    return {w: writer.paths for w, writer in writers.items()}
