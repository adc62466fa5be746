"""Where the real images come from when they are not built in: a folder, a zip archive or an S3 prefix.

A location holds PNG/JPEG files, optionally one sub-folder per class, or a `dataset.json` label file
in the EDM/StyleGAN layout (`{"labels": [["path/in/zip.png", label], ...]}`), which wins over folder
names. The result is uint8 (N, C, H, W) with C = 1 for L images and 3 for RGB, in a canonical
order (by each image's content, then its label) so that the same images give the same arrays and
`content_digest` wherever they live. Every problem stops with a `StageError` naming the file.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages import store
from stages.common import StageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
LABEL_FILE = "dataset.json"
MODES = {"L": 1, "RGB": 3}  # 8-bit grayscale and colour; anything else is converted by the user, knowingly
# Pixels one image may have: far above what these generators train on (28x28 .. 512x512), far below a
# decompression bomb (a few bytes whose header claims 100000x100000 pixels: tens of GB once decoded).
MAX_PIXELS = 4096 * 4096
MAX_FILE_BYTES = 256 << 20  # one image file as stored (a zip member's declared size: a zip bomb is refused unread)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs
S3_BATCH = 256  # objects fetched per concurrent S3 request batch


@dataclass
class RealImages:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray | None  # int64 (N,), None when unlabelled
    origin: str  # the location as the user gave it
    class_names: list[str] | None = None  # sub-folder names, index = label, when labels came from folders


def content_digest(samples: np.ndarray, labels: np.ndarray | None) -> str:
    """sha256 over the arrays themselves: the same data has the same digest, whatever its files were called."""
    h = hashlib.sha256(f"{samples.dtype.str} {list(samples.shape)} labels={labels is not None}\n".encode())
    h.update(np.ascontiguousarray(samples).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


# --- Debian's Fashion-MNIST -------------------------------------------------------------------------

def _idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic, dimension sizes, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    found, = np.frombuffer(raw[:4], ">u4")
    if found != magic:
        raise StageError(f"{path}: not an IDX file of the expected kind (magic {found:#x}, expected {magic:#x}); "
                         "reinstall it: `apt-get install --reinstall dataset-fashion-mnist`")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw[4:4 + 4 * ndim], ">u4").astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(directory: Path | None = None) -> RealImages:
    """The 60,000 training images (28x28 grayscale, 10 classes) from the Debian package."""
    directory = directory or FASHION_MNIST_DIR
    images_file, labels_file = directory / "train-images-idx3-ubyte.gz", directory / "train-labels-idx1-ubyte.gz"
    for path in (images_file, labels_file):
        if not path.is_file():
            raise StageError(f"data.source = fashion-mnist: {path} not found; install Debian's dataset with "
                             "`apt-get install dataset-fashion-mnist`, or choose another data.source")
    images, labels = _idx(images_file, 0x803), _idx(labels_file, 0x801)
    if len(images) != len(labels):
        raise StageError(f"{directory}: {len(images)} images but {len(labels)} labels; "
                         "reinstall it: `apt-get install --reinstall dataset-fashion-mnist`")
    return RealImages(images[:, None].copy(), labels.astype(np.int64), images_file.as_posix())


# --- Locations: a folder, a zip, an S3 prefix -----------------------------------------------------------

class _Location:
    """Files under one root, by relative POSIX name; `show` names a file the way the user can find it."""

    where: str
    names: list[str]

    def show(self, name: str) -> str:
        return f"{self.where.rstrip('/')}/{name}"

    def read(self, names: list[str]) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError


class _Folder(_Location):
    def __init__(self, root: Path, where: str):
        self.root, self.where = root, where
        self.names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def read(self, names):
        for name in names:
            try:
                yield name, (self.root / name).read_bytes()
            except OSError as exc:
                raise StageError(f"{self.show(name)}: cannot be read ({exc.strerror}); fix its permissions "
                                 "or remove it") from None


class _Zip(_Location):
    def __init__(self, archive: zipfile.ZipFile, where: str):
        self.archive, self.where = archive, where
        self.names = sorted(i.filename for i in archive.infolist() if not i.is_dir())

    def show(self, name):
        return f"{name} in {self.where}"

    def read(self, names):
        for name in names:
            size = self.archive.getinfo(name).file_size  # what extraction will write: bounded before it starts
            if size > MAX_FILE_BYTES:
                raise StageError(f"{self.show(name)}: {size:,} bytes uncompressed, more than an image here may have "
                                 f"({MAX_FILE_BYTES:,}); remove it from the archive")
            try:
                yield name, self.archive.read(name)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise StageError(f"{self.show(name)}: cannot be extracted ({exc}); rebuild the archive") from None


class _S3Prefix(_Location):
    def __init__(self, fs, key: str, where: str):
        self.fs, self.key, self.where = fs, key, where
        self.names = sorted(path[len(key) + 1:] for path in fs.find(key))

    def read(self, names):
        for start in range(0, len(names), S3_BATCH):
            batch = names[start:start + S3_BATCH]
            blobs = self.fs.cat([f"{self.key}/{n}" for n in batch], on_error="return")
            for name in batch:
                blob = blobs[f"{self.key}/{name}"]
                if store.is_unreachable(blob):  # the store is down, not this object broken: see _location
                    raise blob
                if isinstance(blob, Exception):
                    raise StageError(f"{self.show(name)}: cannot be read ({blob!r}); check the object and "
                                     "your S3 credentials")
                yield name, blob


def _open_zip(file, where: str) -> _Zip:
    try:
        return _Zip(zipfile.ZipFile(file), where)
    except zipfile.BadZipFile as exc:
        raise StageError(f"data.source = {where}: not a readable zip archive ({exc}); rebuild it "
                         "(e.g. `zip -r data.zip folder/`) or point data.source at the folder") from None


@contextlib.contextmanager
def _location(source: str) -> Iterator[_Location]:
    if source.startswith("s3://"):
        fs, key = store.filesystem(), source[len("s3://"):].strip("/")
        # Around the caller's reads too (they run at the `yield`): a store that goes down mid-read is one line.
        with store.access(fs, f"data.source {source}"):
            try:  # one `info`, not isfile + isdir: isfile answers False for any error, so a dead store cost twice
                kind = fs.info(key).get("type")
            except FileNotFoundError:
                kind = None
            except Exception as exc:  # credentials, permissions: botocore's errors share no base worth naming
                if store.is_unreachable(exc):
                    raise
                raise StageError(f"data.source = {source}: cannot read it ({type(exc).__name__}: {exc}); set AWS "
                                 "credentials, and AWS_ENDPOINT_URL_S3 for a store other than AWS") from None
            if kind == "file":
                with fs.open(key, "rb") as f:
                    yield _open_zip(f, source)
            elif kind == "directory":
                yield _S3Prefix(fs, key, source)
            else:
                raise StageError(f"data.source = {source}: no such S3 object or prefix; check the bucket and key "
                                 "(and AWS_ENDPOINT_URL_S3 / credentials for a non-AWS store)")
        return
    path = Path(source).expanduser()
    if path.is_dir():
        yield _Folder(path, source)
    elif path.is_file():
        with open(path, "rb") as f:
            yield _open_zip(f, source)
    else:
        raise StageError(f"data.source = {source!r} is neither a built-in (mnist, toy2d, fashion-mnist) nor an "
                         "existing folder, .zip or s3:// location; fix the path")


# --- Labels -------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    path = PurePosixPath(name)
    hidden = any(part.startswith(".") or part == "__MACOSX" for part in path.parts)
    return not hidden and path.suffix.lower() in IMAGE_SUFFIXES


def _labels_from_file(loc: _Location, images: list[str]) -> tuple[dict[str, int] | None, None]:
    """dataset.json's labels (EDM/StyleGAN layout): every image exactly once, every entry an image here."""
    _, raw = next(loc.read([LABEL_FILE]))
    label_file = loc.show(LABEL_FILE)
    try:
        entries = json.loads(raw)["labels"]
    except (ValueError, TypeError, KeyError):
        entries = ...
    if entries is None:  # the layout's way to say "unlabelled"
        return None, None
    if not isinstance(entries, list):
        raise StageError(f'{label_file}: not JSON of the form {{"labels": [["path.png", label], ...]}}; '
                         "fix it, or remove it to take labels from class sub-folders")
    known, labels = set(images), {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0):
            raise StageError(f"{label_file}: entry {json.dumps(entry)[:80]} is not [\"path\", class index >= 0]; "
                             "fix the entry")
        name = entry[0].replace("\\", "/")
        if name not in known:
            raise StageError(f"{label_file}: labels {name!r}, which is not an image in {loc.where}; "
                             "remove the entry or add the image")
        if name in labels:
            raise StageError(f"{label_file}: labels {name!r} twice; keep one entry")
        labels[name] = entry[1]
    unlabelled = [n for n in images if n not in labels]
    if unlabelled:
        raise StageError(f"{loc.show(unlabelled[0])}: has no label in {LABEL_FILE} ({len(unlabelled)} images "
                         f"have none); add [\"{unlabelled[0]}\", label] entries or remove the images")
    return labels, None


def _labels_from_folders(loc: _Location, images: list[str]) -> tuple[dict[str, int] | None, list[str] | None]:
    """One sub-folder per class; a single folder wrapping everything (as `zip -r` makes) is not a class."""
    parts = {n: PurePosixPath(n).parts for n in images}
    while all(len(p) > 1 for p in parts.values()) and len({p[0] for p in parts.values()}) == 1:
        parts = {n: p[1:] for n, p in parts.items()}
    top = [n for n, p in parts.items() if len(p) == 1]
    if len(top) == len(parts):
        return None, None
    if top:
        nested = next(n for n, p in parts.items() if len(p) > 1)
        raise StageError(f"{loc.show(top[0])}: lies beside class sub-folders (e.g. {nested}); put every image in "
                         "a class sub-folder, or none of them for unlabelled data")
    names = sorted({p[0] for p in parts.values()}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    index = {name: i for i, name in enumerate(names)}
    return {n: index[p[0]] for n, p in parts.items()}, names


# --- Decoding -----------------------------------------------------------------------------------------

def _decode(loc: _Location, name: str, raw: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # PIL warns above its own limit; ours is lower and refuses below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"]) as img:
                size = img.size  # from the header: nothing is decoded before the size is checked
                if size[0] * size[1] <= MAX_PIXELS:
                    img.load()
                    mode = img.mode
                    array = np.asarray(img)
    except Image.DecompressionBombError as exc:  # PIL's own limit, checked as it opens the file
        size, bomb = None, str(exc).split(",")[0]
    except UnidentifiedImageError:
        raise StageError(f"{loc.show(name)}: not a PNG or JPEG file; replace or delete the file") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise StageError(f"{loc.show(name)}: not a readable PNG/JPEG image ({exc}); replace or delete the file") from None
    if size is None or size[0] * size[1] > MAX_PIXELS:
        claimed = f"claims too many pixels ({bomb})" if size is None else f"claims {size[0]}x{size[1]} pixels"
        raise StageError(f"{loc.show(name)}: {claimed}, above the {MAX_PIXELS:,} pixels an image may have here "
                         "(a decompression bomb, or not a dataset image); refused unread: downscale it or remove it")
    if mode not in MODES:
        raise StageError(f"{loc.show(name)}: has mode {mode}; the pipeline takes 8-bit grayscale (L) or RGB images: "
                         "convert it (e.g. PIL's `image.convert('RGB')`)")
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _describe(array: np.ndarray) -> str:
    return f"{array.shape[2]}x{array.shape[1]} {'L' if array.shape[0] == 1 else 'RGB'}"


def read_images(source: str) -> RealImages:
    """The images (and labels) at a folder, zip archive or s3:// location, canonically ordered."""
    with _location(source) as loc:
        images = [n for n in loc.names if _is_image(n)]
        if not images:
            raise StageError(f"data.source = {source}: no PNG or JPEG images found ({len(loc.names)} other files); "
                             "put the images there, optionally one sub-folder per class")
        if LABEL_FILE in loc.names:
            labels, class_names = _labels_from_file(loc, images)
        else:
            labels, class_names = _labels_from_folders(loc, images)
        arrays, first = [], None
        for name, raw in loc.read(images):
            array = _decode(loc, name, raw)
            if first is None:
                first = (name, array)
            elif array.shape != first[1].shape:
                raise StageError(f"{loc.show(name)}: is {_describe(array)} but {loc.show(first[0])} is "
                                 f"{_describe(first[1])}; every image needs the same size and mode: resize/convert "
                                 "them to one")
            arrays.append(array)
    stacked = np.stack(arrays)
    label_array = None if labels is None else np.array([labels[n] for n in images], np.int64)
    # Canonical order: by each image's content hash, then label; file names and listing order never matter.
    keys = [hashlib.sha256(a.tobytes()).digest() for a in arrays]
    order = sorted(range(len(arrays)), key=lambda i: (keys[i], 0 if label_array is None else label_array[i]))
    return RealImages(stacked[order], None if label_array is None else label_array[order], source, class_names)
