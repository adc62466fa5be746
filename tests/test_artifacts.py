"""stages/artifacts.py: atomic artifact directories with a lineage manifest."""
import json

import pytest

from stages.artifacts import (artifact, atomic_file, directory_digest, read_manifest, sha256_file,
                              verify)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def publish(final="artifacts/thing", files=None, params=None):
    files = files or {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01"}
    with artifact(final, stage="demo", params=params or {"k": 1}, inputs={"up": {"path": "x", "digest": "d"}}) as out:
        for name, data in files.items():
            out.path(name).write_bytes(data)
    return read_manifest(final)


def test_publish_writes_manifest(tmp_path):
    m = publish()
    final = tmp_path / "artifacts/thing"
    assert sorted(m["files"]) == ["a.txt", "sub/b.bin"]
    assert m["files"]["a.txt"] == sha256_file(final / "a.txt")
    assert m["digest"] == directory_digest(m["files"])
    assert m["stage"] == "demo" and m["params"] == {"k": 1}
    assert m["inputs"] == {"up": {"path": "x", "digest": "d"}}
    assert set(m["code"]) == {"git_commit", "dirty"}
    assert "python" in m["packages"] and "torch" in m["packages"]
    assert m["started"] <= m["finished"]
    assert json.loads((final / "manifest.json").read_text()) == m
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["thing"]  # no temp dirs left


def test_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with artifact("artifacts/thing", "demo", {}, {}) as out:
            out.path("a.txt").write_text("partial")
            raise RuntimeError("stage died")
    assert list((tmp_path / "artifacts").iterdir()) == []


def test_exception_keeps_previous_artifact(tmp_path):
    publish(files={"old.txt": b"old"})
    with pytest.raises(RuntimeError):
        with artifact("artifacts/thing", "demo", {}, {}) as out:
            out.path("new.txt").write_text("partial")
            raise RuntimeError
    assert sorted(p.name for p in (tmp_path / "artifacts/thing").iterdir()) == ["manifest.json", "old.txt"]
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["thing"]


def test_republish_replaces(tmp_path):
    publish(files={"old.txt": b"old"})
    m = publish(files={"new.txt": b"new"}, params={"k": 2})
    final = tmp_path / "artifacts/thing"
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "new.txt"]
    assert list(m["files"]) == ["new.txt"] and m["params"] == {"k": 2}
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["thing"]


def test_verify_detects_flipped_byte(tmp_path):
    publish()
    assert verify("artifacts/thing")["stage"] == "demo"
    f = tmp_path / "artifacts/thing/sub/b.bin"
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sub/b\.bin"):
        verify("artifacts/thing")


def test_verify_detects_missing_file(tmp_path):
    publish()
    (tmp_path / "artifacts/thing/a.txt").unlink()
    with pytest.raises(ValueError, match=r"a\.txt.*missing"):
        verify("artifacts/thing")


def test_read_manifest_of_incomplete_dir(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest("half")


def test_atomic_file_keeps_old_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_directory_digest_is_order_independent():
    a = {"x": "1" * 64, "y/z": "2" * 64}
    b = dict(reversed(list(a.items())))
    assert list(a) != list(b) and directory_digest(a) == directory_digest(b)
    assert directory_digest(a) != directory_digest({"x": "1" * 64, "y/z": "3" * 64})
    assert directory_digest(a) != directory_digest({"x": "2" * 64, "y/z": "1" * 64})
