"""Artifacts: content digests, atomic outputs and the lineage manifest every artifact carries.

An artifact is a directory under `artifacts/` holding its files and a `manifest.json`. A stage
writes it into a temporary sibling and renames it into place only when complete, so a failed or
killed stage never leaves an output that a rerun (or DVC) would trust.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from models.errors import InputError

MANIFEST = "manifest.json"


class ArtifactError(InputError, ValueError):
    """An artifact whose files do not match its manifest (changed, corrupted or incomplete)."""


class MissingArtifactError(ArtifactError, FileNotFoundError):
    """An artifact (or its manifest) that is not there: its stage has not run or did not finish."""


TRACKED_PACKAGES = ("torch", "numpy", "safetensors", "prefect", "dvc", "s3fs", "pydantic", "clean-fid", "mlxtend")
# Environment variables that change which kernels run or how work is split, hence the float results:
# these names, and every name with these prefixes (thread counts, ISA caps, OPENBLAS_CORETYPE, MKL_CBWR, ...).
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE",
                "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NEON_DEVICE")
NUMERICS_ENV_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "GOTO", "ONEDNN_", "DNNL_")
# CPU features that oneDNN, MKL and OpenBLAS dispatch on (their kernels, hence the rounding, follow them).
CPU_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digests(path: Path | str, *names: str, chunk: int = 1 << 20) -> dict[str, str]:
    """Hex digests of a file under several hashlib algorithms (e.g. "sha256", "md5"), in one read."""
    hashes = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    return file_digests(path, "sha256", chunk=chunk)["sha256"]


def directory_digest(files: dict[str, str]) -> str:
    """Digest of a directory from its files' relative names and digests (order-free)."""
    return sha256_bytes("".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items())).encode())


def fsync_dir(path: Path | str) -> None:
    """Make a rename or unlink inside `path` durable (a file's own fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds, and only
    after its bytes are on disk, so a power cut never leaves a renamed but empty or torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be read by others
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


SEAL_SUFFIX = ".sha256"


def seal(path: Path | str) -> str:
    """Record `path`'s digest beside it (`<name>.sha256`), written after the file itself: a file is
    trusted later only when the two agree (see `sealed`)."""
    digest = sha256_file(path)
    with atomic_file(f"{path}{SEAL_SUFFIX}") as tmp:
        tmp.write_text(digest + "\n")
    return digest


def recorded_digest(path: Path | str) -> str | None:
    seal_path = Path(f"{path}{SEAL_SUFFIX}")
    return seal_path.read_text().strip() if seal_path.exists() else None


def sealed(path: Path | str) -> bool | None:
    """True: `path` matches its recorded digest. None: unsealed (never finished; redo it). False: the
    bytes changed after they were sealed (corruption the caller must not use)."""
    recorded = recorded_digest(path)
    if recorded is None or not Path(path).exists():
        return None
    return sha256_file(path) == recorded


def unseal(path: Path | str) -> None:
    Path(f"{path}{SEAL_SUFFIX}").unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def work_folder(path: Path | str) -> Iterator[Path]:
    """Resumable partial work (shards, training snapshots) that several runs of one stage may share.

    Each run holds a shared lock on the folder while it works; after a successful run the folder is
    removed only if no other run holds it, so one run never deletes files another is still using.
    A failed or killed run leaves it for the rerun to resume from.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield path
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another run is using it; the last one out removes it
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def code_version(root: Path | None = None) -> dict[str, Any]:
    root = root or Path.cwd()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "models", "stages", "flows"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": None, "dirty": None}
    return {"git_commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def cpu_info() -> dict[str, Any]:
    """The CPU as the kernel libraries see it: vendor, family/model/stepping, model name, dispatch-relevant flags."""
    info: dict[str, Any] = {"machine": platform.machine(), "model_name": platform.processor() or None}
    with contextlib.suppress(OSError):
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
        flags = set(fields.get("flags", "").split())
        info.update(model_name=fields.get("model name") or info["model_name"], vendor=fields.get("vendor_id"),
                    family=fields.get("cpu family"), model=fields.get("model"), stepping=fields.get("stepping"),
                    flags=[f for f in CPU_FLAGS if f in flags])
    return info


def _blas_libraries() -> list[dict[str, Any]]:
    """The BLAS/OpenMP libraries loaded in this process, with the kernel family they picked for this CPU."""
    try:
        from threadpoolctl import threadpool_info

        libs = [{"api": i.get("internal_api"), "version": i.get("version"), "architecture": i.get("architecture"),
                 "threads": i.get("num_threads")} for i in threadpool_info()]
    except Exception as exc:  # noqa: BLE001 (a diagnostic: never the reason a stage fails)
        return [{"error": type(exc).__name__}]
    return sorted(libs, key=lambda d: json.dumps(d, sort_keys=True))


def numerics(device: str = "cpu") -> dict[str, Any]:
    """What bit-identity of float results depends on, beyond code, params and inputs.

    Two runs whose `numerics` are equal (fingerprint included) and whose code, params, inputs and
    packages are equal give byte-identical outputs; any field that differs can change the last bits of
    training and feature extraction, and training amplifies those bits (see README, reproducibility).
    """
    import torch

    config = torch.__config__.show()

    def version(pattern: str) -> str | None:
        m = re.search(pattern, config)
        return m.group(1) if m else None

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_info(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's vector kernels (ATEN_CPU_CAPABILITY)
        "onednn": {"enabled": bool(torch.backends.mkldnn.enabled), "version": version(r"MKL-DNN v(\S+)")},
        "blas": {"torch": version(r"BLAS_INFO=(\w+)"), "mkl": version(r"Math Kernel Library Version (\S+)"),
                 "loaded": _blas_libraries()},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k in NUMERICS_ENV or k.startswith(NUMERICS_ENV_PREFIXES)},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        i = torch.cuda.current_device()
        out["cuda"] = {"device": torch.cuda.get_device_name(i),
                       "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "cudnn_deterministic": torch.backends.cudnn.deterministic,
                       "cudnn_benchmark": torch.backends.cudnn.benchmark,
                       "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                       "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    out["fingerprint"] = sha256_bytes(json.dumps(out, sort_keys=True).encode())[:16]
    return out


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    return sha256_bytes(json.dumps(body, sort_keys=True).encode())


def _restore_hint(artifact_dir: Path) -> str:
    return f"restore it with `dvc checkout {artifact_dir.as_posix()}` or recompute it with `dvc repro`"


def parse_manifest(raw: bytes | str, where: str, fix: str) -> dict[str, Any]:
    """A manifest's JSON, refused (naming `where` and `fix`) unless it matches its own digest."""
    try:
        manifest = json.loads(raw)
        ok = isinstance(manifest, dict) and manifest.get("manifest_digest", _manifest_digest(manifest)) == _manifest_digest(manifest)
    except (ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise ArtifactError(f"{where} is corrupted (it does not match its own digest); {fix}")
    return manifest


def read_manifest(artifact_dir: Path | str) -> dict[str, Any]:
    """An artifact's manifest, refused if it is not the manifest its stage wrote (its own digest)."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.exists():
        raise MissingArtifactError(f"{path} is missing: {artifact_dir} is not a complete artifact; rerun its stage")
    return parse_manifest(path.read_bytes(), str(path), _restore_hint(artifact_dir))


def input_ref(artifact_dir: Path | str) -> dict[str, str]:
    """How a manifest names an input: its path (relative to the project) and its digest. Every file of
    the input is checked against its manifest first, so no stage runs on corrupted bytes."""
    return {"path": Path(artifact_dir).as_posix(), "digest": verify(artifact_dir)["digest"]}


@contextlib.contextmanager
def _folder_lock(folder: Path, flags: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, flags)
        yield fd
    finally:
        os.close(fd)


def _abandoned(folder: Path) -> bool:
    """A staging folder whose writer is gone (killed or crashed): nobody holds its lock."""
    try:
        with _folder_lock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB):
            return True
    except BlockingIOError:
        return False
    except FileNotFoundError:
        return False


class ArtifactWriter:
    """Collects a stage's output files in a staging directory, then publishes it with its manifest.

    Several runs of one stage may write the same artifact at once (two `python -m flows` outside
    DVC's lock): each stages into its own folder, locked while it lives, and only folders whose
    writer is gone are removed. Publishing swaps folders under a lock on the parent folder, so the
    result is one run's complete output, never a mix.
    """

    def __init__(self, final_dir: Path, stage: str, params: dict[str, Any], inputs: dict[str, dict[str, Any]],
                 device: str):
        self.final_dir = Path(final_dir)
        parent, name = self.final_dir.parent, self.final_dir.name
        with _folder_lock(parent):
            for left in parent.glob(f".{name}.old-*"):  # only ever present inside a publish, which holds this lock
                shutil.rmtree(left, ignore_errors=True)
            for left in parent.glob(f".{name}.staging-*"):
                if _abandoned(left):
                    shutil.rmtree(left, ignore_errors=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent))
            self._fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.manifest: dict[str, Any] = {
            "artifact": self.final_dir.as_posix(), "stage": stage, "params": params, "inputs": inputs,
            "code": code_version(), "packages": package_versions(), "device": device, "numerics": numerics(device),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._t0 = time.monotonic()
        self.extra: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self) -> dict[str, Any]:
        paths = [p for p in sorted(self.dir.rglob("*")) if p.is_file() and p.name != MANIFEST]
        for p in paths:  # stage code writes through out.path(): flush those bytes before they become the artifact
            fsync_file(p)
        files = {p.relative_to(self.dir).as_posix(): sha256_file(p) for p in paths}
        self.manifest.update(files=files, digest=directory_digest(files), **self.extra,
                             finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             seconds=round(time.monotonic() - self._t0, 3))
        self.manifest["manifest_digest"] = _manifest_digest(self.manifest)
        write_json(self.dir / MANIFEST, self.manifest)
        for d in {p.parent for p in paths} | {self.dir}:
            fsync_dir(d)
        os.chmod(self.dir, 0o755)  # mkdtemp creates 0700
        parent = self.final_dir.parent
        with _folder_lock(parent):
            old = Path(tempfile.mkdtemp(prefix=f".{self.final_dir.name}.old-", dir=parent))
            if self.final_dir.exists():
                os.replace(self.final_dir, old / "previous")
            os.replace(self.dir, self.final_dir)
            fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        return self.manifest

    def discard(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def artifact(final_dir: Path | str, stage: str, params: dict[str, Any], inputs: dict[str, dict[str, Any]],
             device: str = "cpu") -> Iterator[ArtifactWriter]:
    """Write an artifact atomically: `with artifact(...) as out: save(out.path("x"))`."""
    Path(final_dir).parent.mkdir(parents=True, exist_ok=True)
    writer = ArtifactWriter(Path(final_dir), stage, params, inputs, device)
    try:
        yield writer
        writer.publish()
    finally:
        writer.discard()


def verify(artifact_dir: Path | str) -> dict[str, Any]:
    """Check every file of an artifact against its manifest; raise naming the first mismatch."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    for name, digest in manifest["files"].items():
        path = artifact_dir / name
        if not path.exists():
            raise MissingArtifactError(f"{path} is listed in {artifact_dir / MANIFEST} but missing; rerun stage {manifest['stage']}")
        actual = sha256_file(path)
        if actual != digest:
            raise ArtifactError(f"{path} has sha256 {actual[:16]}..., its manifest says {digest[:16]}...: "
                                f"the file was changed or corrupted; {_restore_hint(artifact_dir)}")
    return manifest
