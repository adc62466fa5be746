"""Checkpoints as safetensors, with the family and its config in the metadata.

Never unpickles: a pickled checkpoint is refused with instructions to convert it.

Besides `save`/`read` (whole state dicts in memory) this module streams: `open_checkpoint` memory-maps
a file (or a Hugging Face `*.safetensors.index.json` of shards) and hands out zero-copy views of each
tensor, and `open_writer` writes the header first, then each tensor's bytes as they are produced, as
one file or as Hugging Face shards plus their index. The streaming half needs numpy only: torch is
imported where a function needs it, so a streaming process does not pay torch's import (seconds and
~280 MB of anonymous memory).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import queue
import struct
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from safetensors import SafetensorError

from models.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from models import family as families

METADATA_KEY = "neon"
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
MAX_HEADER_SIZE = 100_000_000  # the safetensors library's own limit
# Hugging Face's default shard size (huggingface_hub's MAX_SHARD_SIZE "5GB", in bytes of tensor data).
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
INDEX_SUFFIX = ".index.json"


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be read safely or does not fit the params."""


def metadata_for(family: str, config: dict[str, Any], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The safetensors `__metadata__` that `save` writes: one key holding sorted JSON.

    One key because safetensors writes several keys in hash order, which would make the same weights
    give different bytes (and digests) from run to run.
    """
    meta = {"format": "neon-checkpoint/1", "family": family, "config": json.dumps(config, sort_keys=True)}
    meta.update(extra or {})
    return {METADATA_KEY: json.dumps(meta, sort_keys=True)}


def parse_metadata(raw: Mapping[str, str] | None) -> dict[str, str]:
    """The fields `save` wrote (family, config, extras), or the raw metadata of a foreign file."""
    raw = dict(raw or {})
    return json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else raw


def save(path: Path | str, state: dict[str, torch.Tensor], family: str, config: dict[str, Any],
         extra: dict[str, str] | None = None) -> None:
    """Write `state` to `path` (the caller makes it atomic by passing a temporary path)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata=metadata_for(family, config, extra))


def _check_not_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors starts with a u64 header length then "{": that length's low bytes can look like a
    # pickle protocol marker (e.g. 0x0380), so only a file that is not safetensors is tested for pickle.
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and head.startswith(PICKLE_MAGIC):
        raise CheckpointError(
            f"{path} is a pickled PyTorch checkpoint, which this pipeline never loads (unpickling runs code). "
            "Convert it once in a trusted environment: `safetensors.torch.save_file(torch.load(p, weights_only=True), "
            "'model.safetensors')`")


def _unreadable(path: Path | str, why: Any) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors checkpoint ({why}); re-download or re-export it")


def read(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The whole state dict in memory and the parsed metadata. A shard index is read shard by shard,
    also where `path` is missing but `<path>.index.json` exists (a sharded output of `open_writer`)."""
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX) or (not path.exists() and Path(str(path) + INDEX_SUFFIX).exists()):
        with open_checkpoint(path) as ckpt:
            return {name: ckpt.tensor(name).clone() for name in ckpt.tensors}, ckpt.meta
    from safetensors.torch import load_file, safe_open

    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), parse_metadata(meta)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None


# ---------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its name in the header, size, kind, numpy storage type and torch name."""
    name: str
    itemsize: int
    kind: str  # "float", "int", "bool" or "complex"
    storage: str  # numpy dtype the raw bytes are viewed as (BF16 and FP8 have none of their own)
    torch_name: str
    rank: int  # position in safetensors' Rust `Dtype` enum: files are laid out by descending rank, then name

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def __str__(self) -> str:
        return f"torch.{self.torch_name}"


# In the order of safetensors' `Dtype` enum (safetensors 0.7/0.8: BOOL, F4, F6_E2M3, F6_E3M2, U8, I8,
# F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64,
# U64); the sub-byte F4/F6 types, which torch cannot hold unpacked, are not supported.
_DTYPE_TABLE = [
    ("BOOL", 1, "bool", "|b1", "bool", 0),
    ("U8", 1, "int", "|u1", "uint8", 4),
    ("I8", 1, "int", "|i1", "int8", 5),
    ("F8_E5M2", 1, "float", "|u1", "float8_e5m2", 6),
    ("F8_E4M3", 1, "float", "|u1", "float8_e4m3fn", 7),
    ("F8_E8M0", 1, "float", "|u1", "float8_e8m0fnu", 8),
    ("F8_E4M3FNUZ", 1, "float", "|u1", "float8_e4m3fnuz", 9),
    ("F8_E5M2FNUZ", 1, "float", "|u1", "float8_e5m2fnuz", 10),
    ("I16", 2, "int", "<i2", "int16", 11),
    ("U16", 2, "int", "<u2", "uint16", 12),
    ("F16", 2, "float", "<f2", "float16", 13),
    ("BF16", 2, "float", "<u2", "bfloat16", 14),
    ("I32", 4, "int", "<i4", "int32", 15),
    ("U32", 4, "int", "<u4", "uint32", 16),
    ("F32", 4, "float", "<f4", "float32", 17),
    ("C64", 8, "complex", "<c8", "complex64", 18),
    ("F64", 8, "float", "<f8", "float64", 19),
    ("I64", 8, "int", "<i8", "int64", 20),
    ("U64", 8, "int", "<u8", "uint64", 21),
]
DTYPES: dict[str, DType] = {row[0]: DType(*row) for row in _DTYPE_TABLE}
_BY_TORCH_NAME = {d.torch_name: d for d in DTYPES.values()}
_BY_NUMPY = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int16): "I16",
             np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
             np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32", np.dtype(np.complex64): "C64",
             np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64"}


def dtype_of(dtype: Any) -> DType:
    """The safetensors dtype of a `DType`, a safetensors name ("F32"), a torch dtype or a numpy dtype."""
    if isinstance(dtype, DType):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if type(dtype).__module__ == "torch":  # torch.dtype, without importing torch
        name = str(dtype).removeprefix("torch.")
        if name in _BY_TORCH_NAME:
            return _BY_TORCH_NAME[name]
    else:
        try:
            return DTYPES[_BY_NUMPY[np.dtype(dtype)]]
        except (KeyError, TypeError):
            pass
    raise ValueError(f"dtype {dtype!r} cannot be stored in safetensors by this module")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `offset` is absolute in `path` (header included)."""
    name: str
    dtype: DType
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return _numel(self.shape)


# ---------------------------------------------------------------------------------------------------
# lazy, memory-mapped reading
# ---------------------------------------------------------------------------------------------------

def read_header(path: Path | str) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """A safetensors file's `__metadata__` and tensors (in file order), validated as safetensors does:
    known dtypes, sizes that match the shapes, and offsets that tile the data region exactly."""
    path = Path(path)
    _check_not_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_SIZE or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            text = f.read(n)
        if not text.startswith(b"{"):
            raise ValueError("header is not a JSON object")
        header = json.loads(text)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unreadable(path, exc) from None
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _unreadable(path, "`__metadata__` is not a map of strings")
    data_start, entries = 8 + n, []
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            start, end = entry["data_offsets"]
            if not all(isinstance(s, int) and s >= 0 for s in (*shape, start, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _unreadable(path, f"tensor `{name}` has a malformed or unsupported entry {entry!r}") from None
        if end - start != _numel(shape) * dtype.itemsize:
            raise _unreadable(path, f"tensor `{name}`: {end - start} bytes for shape {list(shape)} {dtype.name}")
        entries.append((start, end, name, dtype, shape))
    entries.sort()
    tensors, expect = {}, 0
    for start, end, name, dtype, shape in entries:
        if start != expect:
            raise _unreadable(path, f"tensor `{name}` starts at byte {start}, expected {expect}")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + start, end - start)
        expect = end
    if data_start + expect != size:
        raise _unreadable(path, f"the tensors cover {expect} bytes, the file holds {size - data_start}")
    return metadata, tensors


class _MappedFile:
    """One file mapped read-only and shared: no memory is committed for it (a private, writable map of
    a file larger than RAM is refused by Linux's overcommit check), and its pages are the page cache's."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None

    def advise(self, offset: int, nbytes: int, advice: int) -> None:
        """madvise on the whole pages inside [offset, offset + nbytes); a hint, so failures are ignored."""
        if self.mm is None or nbytes <= 0:
            return
        lo = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if advice == mmap.MADV_WILLNEED:  # read-ahead may round outwards
            lo = offset // mmap.PAGESIZE * mmap.PAGESIZE
            hi = min(len(self.mm), -(-(offset + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if hi > lo:
            try:
                self.mm.madvise(advice, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # views still alive: the mapping goes when the last of them does
                pass
            self.mm = None


class CheckpointReader:
    """A safetensors checkpoint opened lazily: the header now, tensor bytes only when touched.

    `path` is a `.safetensors` file or a Hugging Face `*.safetensors.index.json` (shards beside it);
    a `.safetensors` path that does not exist but has an index beside it (`<path>.index.json`, as
    `open_writer` writes for a sharded output) is opened through that index.
    """

    def __init__(self, path: Path | str):
        path = Path(path)
        if not path.exists() and Path(str(path) + INDEX_SUFFIX).exists():
            path = Path(str(path) + INDEX_SUFFIX)
        self.path = path
        self.files: dict[Path, _MappedFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        if path.name.endswith(INDEX_SUFFIX):
            self.metadata = self._open_index(path)
        else:
            self.metadata, self.tensors = read_header(path)
        try:
            for info in self.tensors.values():
                if info.path not in self.files:
                    self.files[info.path] = _MappedFile(info.path)
        except OSError as exc:
            self.close()
            raise _unreadable(path, exc) from None

    def _open_index(self, path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text())
            weight_map, index_meta = index["weight_map"], index.get("metadata") or {}
            if not isinstance(weight_map, dict) or not isinstance(index_meta, dict):
                raise TypeError("`weight_map` and `metadata` must be JSON objects")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors index ({exc!r}); "
                                  "re-download or re-export it") from None
        shards: dict[str, tuple[dict[str, str], dict[str, TensorInfo]]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{path}: tensor `{name}` points at {shard!r}, not a file beside the index")
            if shard not in shards:
                shards[shard] = read_header(path.parent / shard)
            found = shards[shard][1].get(name)
            if found is None:
                raise CheckpointError(f"{path}: tensor `{name}` is not in its shard {shard}; "
                                      "re-download the checkpoint")
            self.tensors[name] = found
        meta = {k: v for k, v in index_meta.items() if k != "total_size" and isinstance(v, str)}
        if not meta and shards:
            meta = next(iter(shards.values()))[0]
        return meta

    @property
    def meta(self) -> dict[str, str]:
        """The metadata `save` wrote, parsed (family, config, extras)."""
        return parse_metadata(self.metadata)

    def _mm(self, info: TensorInfo) -> mmap.mmap | None:
        mapped = self.files.get(info.path)
        if mapped is None:
            raise ValueError(f"{self.path} is closed")
        return mapped.mm

    def array(self, name: str) -> np.ndarray:
        """Zero-copy, read-only numpy view of a tensor's raw storage (BF16 as uint16, FP8 as uint8), in its shape."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return np.empty(info.shape, dtype=info.dtype.storage)
        return np.frombuffer(self._mm(info), dtype=info.dtype.storage, count=info.numel,
                             offset=info.offset).reshape(info.shape)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy torch view of a tensor on the read-only map: read it, or `.clone()` it before any
        in-place change (writing to read-only memory kills the process)."""
        import warnings

        import torch

        info = self.tensors[name]
        dtype = getattr(torch, info.dtype.torch_name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        with warnings.catch_warnings():  # "buffer is not writable": known, and documented above
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(self._mm(info), dtype=dtype, count=info.numel, offset=info.offset)
        return t.reshape(info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read a tensor ahead (a no-op when it is in the page cache already)."""
        info = self.tensors[name]
        self.files[info.path].advise(info.offset, info.nbytes, mmap.MADV_WILLNEED)

    def release(self, name: str) -> None:
        """Unmap a tensor's pages from this process (they stay in the page cache): keeps RSS bounded."""
        info = self.tensors[name]
        self.files[info.path].advise(info.offset, info.nbytes, mmap.MADV_DONTNEED)

    def close(self) -> None:
        for mapped in self.files.values():
            mapped.close()
        self.files = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: Path | str) -> CheckpointReader:
    """Open a `.safetensors` file or a `*.safetensors.index.json` lazily (see `CheckpointReader`)."""
    return CheckpointReader(path)


# ---------------------------------------------------------------------------------------------------
# incremental writing
# ---------------------------------------------------------------------------------------------------

Spec = tuple[Any, Sequence[int]]  # (dtype as anything `dtype_of` takes, shape)


def _json_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # escapes exactly what serde_json escapes


def safetensors_header(specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None
                       ) -> tuple[bytes, list[tuple[str, DType, tuple[int, ...], int, int]]]:
    """The bytes before the data (8-byte length + JSON header) that safetensors itself would write for
    tensors of these dtypes and shapes, and the layout [(name, dtype, shape, start, end)] relative to
    the data. Same rules as safetensors' `prepare`: sorted by descending dtype rank then name, header
    JSON compact (`__metadata__` first), padded with spaces to a multiple of 8 bytes. (Metadata keys
    are written in the given order; safetensors writes several in hash order, hence `save`'s one key.)"""
    items = sorted(((name, dtype_of(dt), tuple(int(s) for s in shape)) for name, (dt, shape) in specs.items()),
                   key=lambda item: (-item[1].rank, item[0]))
    parts, layout, offset = [], [], 0
    if metadata is not None:  # even empty: safetensors writes `"__metadata__":{}` then
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        inner = ",".join(f"{_json_str(k)}:{_json_str(v)}" for k, v in metadata.items())
        parts.append(f'"__metadata__":{{{inner}}}')
    for name, dtype, shape in items:
        nbytes = _numel(shape) * dtype.itemsize
        parts.append(f'{_json_str(name)}:{{"dtype":"{dtype.name}","shape":[{",".join(map(str, shape))}],'
                     f'"data_offsets":[{offset},{offset + nbytes}]}}')
        layout.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    text = ("{" + ",".join(parts) + "}").encode()
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_SIZE:
        raise ValueError(f"safetensors header of {len(text)} bytes is over the format's limit")
    return struct.pack("<Q", len(text)) + text, layout


def _byte_view(data: Any) -> memoryview:
    """The raw bytes of a contiguous numpy array, torch tensor (on CPU) or bytes-like object."""
    if type(data).__module__.startswith("torch"):
        import torch

        data = data.detach()
        if not data.is_contiguous():
            raise ValueError("tensor data must be contiguous")
        data = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
    elif isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("array data must be contiguous")
        data = data.reshape(-1).view(np.uint8)  # any dtype (complex, bool) as bytes
    return memoryview(data).cast("B")


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _load_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: streaming falls back to plain writes
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4
STREAM_WINDOW = 8 << 20  # bytes handed to writeback at a time
STREAM_BUDGET = 512 << 20  # bytes in flight (all files together) before the oldest window is waited for
STREAM_QUEUE = 16  # windows queued for the writeback thread before a writer waits (the back-pressure)


class _Writeback:
    """One thread per process streaming written windows to disk: it starts writeback of each window
    at once (sync_file_range WRITE) and, once more than STREAM_BUDGET bytes (all files together) are
    in flight, waits for the oldest window and drops it from the page cache (POSIX_FADV_DONTNEED).
    Writers only queue windows, so this runs beside their computing and writing (ctypes and
    posix_fadvise release the GIL); a full queue makes them wait: the disk's speed then sets the pace."""

    _instance: _Writeback | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> _Writeback:
        with cls._lock:
            if cls._instance is None or cls._instance.pid != os.getpid():  # none yet, or a forked child
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.queue: queue.Queue = queue.Queue(maxsize=STREAM_QUEUE)
        threading.Thread(target=self._run, name="safetensors-writeback", daemon=True).start()

    def window(self, fd: int, lo: int) -> None:
        self.queue.put((fd, lo, None))

    def finish(self, fd: int, tail: int | None) -> None:
        """Hand the tail from byte `tail` (None: nothing) to writeback and forget `fd`; returns once the
        thread is done with `fd`, so the caller may close it."""
        done = threading.Event()
        self.queue.put((fd, tail, done))
        done.wait()

    def _run(self) -> None:
        inflight: deque[tuple[int, int]] = deque()  # (fd, window start), oldest first
        while True:
            fd, lo, done = self.queue.get()
            try:
                if done is not None:  # a writer closes fd: forget its windows (they stay cached, clean once written)
                    inflight = deque(item for item in inflight if item[0] != fd)
                    if lo is not None:
                        _sync_file_range(fd, lo, 0, _SFR_WRITE)  # the tail, not waited for
                    continue
                _sync_file_range(fd, lo, STREAM_WINDOW, _SFR_WRITE)
                inflight.append((fd, lo))
                while len(inflight) * STREAM_WINDOW > STREAM_BUDGET:
                    old_fd, old = inflight.popleft()
                    _sync_file_range(old_fd, old, STREAM_WINDOW, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
                    os.posix_fadvise(old_fd, old, STREAM_WINDOW, os.POSIX_FADV_DONTNEED)
            except OSError:  # hints only: a failed write shows at the reader's checks, as without them
                pass
            finally:
                if done is not None:
                    done.set()


class SafetensorsWriter:
    """One safetensors file written incrementally: the header at once (offsets follow from the known
    dtypes and shapes), then each tensor's bytes, in pieces, as they are produced.

    For the same tensors and metadata the file is byte-identical to `safetensors.torch.save_file`'s.
    Each tensor is written front to back (`write(name, piece, start)` with `start` the element where
    the piece begins); a tensor may be rewritten from its start. `close` checks that every byte was
    written. No fsync: like `save_file` and `cp`, durability is left to the caller.

    `stream=True` is for outputs larger than the kernel's dirty-page budget (several GB at once): every
    8 MB written is handed to writeback at once, and, past STREAM_BUDGET bytes in flight, the oldest
    is waited for and dropped from the page cache (sync_file_range + POSIX_FADV_DONTNEED). Plain
    buffered writes of that much get throttled and evict other files (e.g. the inputs) from the cache;
    streamed, they go at the disk's speed and leave the cache as it was. The output is then not in the
    page cache for its next reader, and, as without it, not fsynced.
    """

    def __init__(self, path: Path | str, specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None,
                 stream: bool = False):
        self.path = Path(path)
        self._stream = _Writeback.get() if stream and _sync_file_range is not None else None
        self._kicked, self._high = 0, 0
        header, layout = safetensors_header(specs, metadata)
        self.tensors = {name: TensorInfo(name, dtype, shape, self.path, len(header) + start, end - start)
                        for name, dtype, shape, start, end in layout}
        self.order = list(self.tensors)  # file order: writing in it is sequential
        self._done = dict.fromkeys(self.tensors, 0)  # bytes written from each tensor's start
        self.size = len(header) + (layout[-1][4] if layout else 0)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            os.ftruncate(self._fd, self.size)
            _pwrite_all(self._fd, memoryview(header), 0)
            self._written(len(header))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, data: Any, start: int = 0) -> None:
        """Write `data` (raw storage of the tensor's dtype: numpy array, torch tensor or bytes) at element `start`."""
        info = self.tensors[name]
        buf = _byte_view(data)
        lo = start * info.dtype.itemsize
        if len(buf) % info.dtype.itemsize or lo + len(buf) > info.nbytes or start < 0:
            raise ValueError(f"tensor `{name}`: {len(buf)} bytes at element {start} do not fit {info.nbytes} bytes "
                             f"of {info.dtype.name}")
        if lo > self._done[name]:
            raise ValueError(f"tensor `{name}`: write at byte {lo} leaves a gap after byte {self._done[name]}")
        _pwrite_all(self._fd, buf, info.offset + lo)
        self._done[name] = max(self._done[name], lo + len(buf))
        self._written(info.offset + lo + len(buf))

    def _written(self, end: int) -> None:
        """Streaming: hand each full window behind the writer to the writeback thread."""
        if self._stream is None:
            return
        self._high = max(self._high, end)
        while self._high - self._kicked >= STREAM_WINDOW:
            self._stream.window(self._fd, self._kicked)
            self._kicked += STREAM_WINDOW

    def close(self) -> None:
        if self._fd is None:
            return
        missing = [name for name, info in self.tensors.items() if self._done[name] != info.nbytes]
        if self._stream is not None and not missing:
            self._stream.finish(self._fd, self._kicked)  # the tail goes to writeback too
        self.abort()
        if missing:
            raise ValueError(f"{self.path}: tensor `{missing[0]}` was not written in full ({len(missing)} incomplete)")

    def abort(self) -> None:
        """Close without checks (the caller deletes the incomplete file)."""
        if self._fd is not None:
            if self._stream is not None:
                self._stream.finish(self._fd, None)  # no window of this fd may outlive it
            os.close(self._fd)
            self._fd = None

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.abort() if exc_type else self.close()


class CheckpointWriter:
    """A checkpoint written incrementally as one file, or, over `max_shard_size` bytes of tensor data, as
    Hugging Face shards `<stem>-00001-of-0000N.safetensors` plus `<name>.index.json` beside `path`
    (for `model.safetensors`: exactly `save_pretrained`'s names). Tensors go to shards in name order,
    a new shard when the next would pass the limit, a tensor over the limit alone (huggingface_hub's
    rule). Each shard carries the same metadata; the index's `metadata` holds it plus `total_size`.
    """

    def __init__(self, path: Path | str, specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None,
                 max_shard_size: int | None = DEFAULT_MAX_SHARD_SIZE, stream: bool = False):
        self.path = Path(path)
        self.metadata = None if metadata is None else dict(metadata)
        sizes = {name: _numel(shape) * dtype_of(dt).itemsize for name, (dt, shape) in specs.items()}
        self.total_size = sum(sizes.values())
        groups: list[list[str]] = [[]]
        if max_shard_size is None or self.total_size <= max_shard_size:
            groups[0] = list(specs)
        else:
            used = 0
            for name in sorted(specs):
                if groups[-1] and used + sizes[name] > max_shard_size:
                    groups.append([])
                    used = 0
                groups[-1].append(name)
                used += sizes[name]
        self.index_path = None if len(groups) == 1 else Path(str(self.path) + INDEX_SUFFIX)
        stem = self.path.name.removesuffix(".safetensors")
        self.shards: list[SafetensorsWriter] = []
        try:
            for i, group in enumerate(groups):
                shard_path = self.path if self.index_path is None else \
                    self.path.with_name(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors")
                self.shards.append(SafetensorsWriter(shard_path, {n: specs[n] for n in group}, self.metadata, stream))
        except BaseException:
            self.abort()
            raise
        self._shard_of = {name: shard for shard in self.shards for name in shard.tensors}
        self.tensors = {name: info for shard in self.shards for name, info in shard.tensors.items()}
        self.order = [name for shard in self.shards for name in shard.order]

    def write(self, name: str, data: Any, start: int = 0) -> None:
        self._shard_of[name].write(name, data, start)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards] + ([self.index_path] if self.index_path else [])

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        if self.index_path is not None:
            index = {"metadata": {"total_size": self.total_size, **(self.metadata or {})},
                     "weight_map": {name: shard.path.name for name, shard in sorted(self._shard_of.items())}}
            self.index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        for shard in self.shards:
            shard.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.abort() if exc_type else self.close()


def open_writer(path: Path | str, specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None,
                max_shard_size: int | None = DEFAULT_MAX_SHARD_SIZE, stream: bool = False) -> CheckpointWriter:
    """Start writing a checkpoint of these tensors (see `CheckpointWriter`; `stream`: see `SafetensorsWriter`);
    `metadata` as `metadata_for` makes."""
    return CheckpointWriter(path, specs, metadata, max_shard_size, stream)


def specs_of(state: Mapping[str, Any]) -> dict[str, Spec]:
    """{name: (dtype, shape)} of a state dict of torch tensors or numpy arrays, for `open_writer`."""
    return {name: (t.dtype, tuple(t.shape)) for name, t in state.items()}


def write_state(path: Path | str, state: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                max_shard_size: int | None = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write a whole state dict through `open_writer` (sharded if large); the paths written."""
    with open_writer(path, specs_of(state), metadata, max_shard_size) as writer:
        for name in writer.order:
            t = state[name]
            if type(t).__module__.startswith("torch"):
                t = t.detach().cpu().contiguous()
            writer.write(name, t)
    return writer.paths


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------

def config_of(meta: dict[str, str], path: Path | str) -> tuple[str, dict[str, Any]]:
    if "family" not in meta or "config" not in meta:
        raise CheckpointError(f"{path} has no `family`/`config` metadata; save it with models.checkpoint.save")
    return meta["family"], json.loads(meta["config"])


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Raise naming the first tensor that is missing, unexpected or of the wrong shape/dtype."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{path} does not match the model architecture: tensor `{missing[0]}` is missing "
                              f"({len(missing)} missing in all); set `model.*` in params.yaml to the checkpoint's architecture")
    if extra:
        raise CheckpointError(f"{path} does not match the model architecture: unexpected tensor `{extra[0]}` "
                              f"({len(extra)} extra in all); set `model.*` in params.yaml to the checkpoint's architecture")
    for name, ref in expected.items():
        got = state[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckpointError(f"{path} does not match the model architecture: tensor `{name}` is "
                                  f"{tuple(got.shape)} {got.dtype}, the model expects {tuple(ref.shape)} {ref.dtype}")


def load_model(path: Path | str, expect: dict[str, Any] | None = None,
               fallback: tuple[str, dict[str, Any]] | None = None) -> tuple[nn.Module, families.Family, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights (eval mode, on CPU).

    `expect` (family and config fields from params) must agree with the checkpoint's own metadata;
    `fallback` (family, config) describes a plain state dict saved without that metadata.
    """
    from models import family as families

    state, meta = read(path)
    if fallback is not None and "config" not in meta:
        family_name, config = fallback
    else:
        family_name, config = config_of(meta, path)
    for key, want in (expect or {}).items():
        have = family_name if key == "family" else config.get(key)
        if have is not None and _norm(have) != _norm(want):
            raise CheckpointError(f"{path} was saved with {key}={have!r} but params.yaml asks for {want!r}; "
                                  f"set model.{key} (or the data shape) to match the checkpoint")
    family = families.get(family_name)
    model = family.build(config)
    check_compatible(model, state, path)
    model.load_state_dict(state)
    return model.eval(), family, config


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
