"""A file or an artifact is renamed into place only after its bytes are flushed, and the rename itself is
flushed (fsync of the directory), so a power cut after a stage ends never leaves an empty or torn file."""
from __future__ import annotations

import os
import stat

from stages.artifacts import artifact, atomic_file, sealed, seal


def record_syscalls(monkeypatch) -> list[tuple[str, str]]:
    """(call, what) for every fsync and rename, in order; fsync names the kind of object it flushed."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        calls.append(("fsync", ("dir:" if stat.S_ISDIR(mode) else "file:") + os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_atomic_file_flushes_the_bytes_then_renames_then_flushes_the_directory(tmp_path, monkeypatch):
    calls = record_syscalls(monkeypatch)
    target = tmp_path / "out.json"
    with atomic_file(target) as tmp:
        tmp.write_text("{}")
    kinds = [(c, what.split(":")[0] if c == "fsync" else "") for c, what in calls]
    assert kinds == [("fsync", "file"), ("replace", ""), ("fsync", "dir")], calls
    assert calls[0][1].startswith(f"file:{tmp_path}/.out.json.") and calls[2][1] == f"dir:{tmp_path}"


def test_an_artifact_is_flushed_file_by_file_before_it_is_published(tmp_path, monkeypatch):
    calls = record_syscalls(monkeypatch)
    final = tmp_path / "artifacts" / "thing"
    with artifact(final, "test", {}, {}) as out:
        with open(out.path("sub/weights.bin"), "wb") as f:  # written by stage code, not through atomic_file
            f.write(b"\0" * 1000)
    publish = next(i for i, (c, what) in enumerate(calls) if c == "replace" and what.endswith(f"-> {final}"))
    flushed_before = {what for c, what in calls[:publish] if c == "fsync"}
    assert any(w.startswith("file:") and w.endswith("/sub/weights.bin") for w in flushed_before), calls
    assert any(w.startswith("dir:") and w.endswith("/sub") for w in flushed_before), calls
    assert ("fsync", f"dir:{final.parent}") in calls[publish:], calls
    assert (final / "sub" / "weights.bin").stat().st_size == 1000


def test_a_seal_is_written_after_its_file_and_tells_unfinished_from_corrupted(tmp_path):
    shard = tmp_path / "shard.npz"
    shard.write_bytes(b"x" * 64)
    assert sealed(shard) is None  # written but never sealed: a killed run's file, to redo
    seal(shard)
    assert sealed(shard) is True
    shard.write_bytes(b"y" * 64)
    assert sealed(shard) is False  # changed after sealing: corruption
