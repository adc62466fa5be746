"""Lineage and fetch against a real SeaweedFS holding several runs: every step is by exact object version."""
from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
import yaml

from stages import fetch, lineage, store
from tests.conftest import BIN, restored, run, set_params

pytestmark = pytest.mark.e2e

MERGED_W1 = "s3://neon/dvc/artifacts/merged/model.safetensors"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fs(s3_store, monkeypatch):
    for k, v in store.s3_env(s3_store.endpoint).items():
        monkeypatch.setenv(k, v)
    return store.filesystem(s3_store.endpoint)


def _put(fs, key: str, data: bytes) -> str:
    fs.pipe_file(key, data)
    return fs.info(key, refresh=True)["VersionId"]


def test_fetch_downloads_the_version_whose_info_it_read(fs, tmp_path, monkeypatch):
    """A new version lands between `info` and the download: the copy and its recorded version are the first's."""
    key = f"neon/race-{uuid.uuid4().hex[:8]}/model.safetensors"
    first = _put(fs, key, b"first version")

    class OverwrittenAfterInfo:
        def __getattr__(self, name):
            return getattr(fs, name)

        def info(self, path, **kw):
            out = fs.info(path, **kw)
            fs.pipe_file(key, b"second version, written by someone else")
            return out

    monkeypatch.setattr(store, "filesystem", lambda *a, **k: OverwrittenAfterInfo())
    origin = fetch._download(f"s3://{key}", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"first version"
    assert origin == {"version_id": first}
    assert len(fs.object_version_info(key)) == 2  # the race really happened


def _put_artifact(fs, prefix: str, artifact: str, inputs: dict, files: dict[str, bytes], run_no: int) -> dict:
    """Push one artifact folder like DVC does (files, then manifest); return its digest and object versions."""
    manifest = {"artifact": artifact, "stage": artifact.split("/")[1], "params": {"run": run_no}, "inputs": inputs,
                "files": {name: _sha(data) for name, data in files.items()},
                "digest": _sha(f"{artifact} {run_no}".encode())}
    versions = {name: _put(fs, f"{prefix}/{artifact}/{name}", data) for name, data in files.items()}
    return {"digest": manifest["digest"], **versions,
            "manifest": _put(fs, f"{prefix}/{artifact}/manifest.json", json.dumps(manifest).encode())}


def _push_run(fs, prefix: str, run_no: int) -> dict:
    base = _put_artifact(fs, prefix, "artifacts/base", {}, {}, run_no)
    merged = _put_artifact(fs, prefix, "artifacts/merged", {"base": {"path": "artifacts/base", "digest": base["digest"]}},
                           {"w=1.safetensors": f"weights of run {run_no}".encode()}, run_no)
    return {"base": base["digest"], "base_version": base["manifest"], "file_version": merged["w=1.safetensors"],
            "merged_version": merged["manifest"]}


def test_lineage_in_s3_follows_the_recorded_digests_not_the_latest(fs):
    prefix = f"neon/runs-{uuid.uuid4().hex[:8]}"
    one, two = _push_run(fs, prefix, 1), _push_run(fs, prefix, 2)
    target = f"s3://{prefix}/artifacts/merged/w=1.safetensors"

    older = lineage.render(f"{target}?versionId={one['file_version']}")
    assert one["base"][:16] in older and two["base"][:16] not in older
    assert f"manifest version {one['base_version']}" in older
    assert f"manifest version {one['merged_version']}" in older
    assert lineage.render(target, version_id=one["file_version"]) == older
    assert lineage.render(f"s3://{prefix}/artifacts/merged/manifest.json?versionId={one['merged_version']}") == older

    latest = lineage.render(target)
    assert two["base"][:16] in latest and one["base"][:16] not in latest
    assert lineage.render(f"s3://{prefix}/artifacts/merged") == latest


def test_lineage_follows_a_base_fetched_from_s3_to_the_version_it_fetched(fs):
    """fetch records the checkpoint's version id: the walk reads that version, checks its sha256, then its run."""
    theirs, ours = f"neon/theirs-{uuid.uuid4().hex[:8]}", f"neon/ours-{uuid.uuid4().hex[:8]}"
    runs = [_put_artifact(fs, theirs, "artifacts/train", {}, {"model.safetensors": f"model {i}".encode()}, i)
            for i in (1, 2)]
    uri = f"s3://{theirs}/artifacts/train/model.safetensors"
    ref = {"path": uri, "sha256": _sha(b"model 1"), "version_id": runs[0]["model.safetensors"], "digest": runs[0]["digest"]}
    _put_artifact(fs, ours, "artifacts/base", {"checkpoint": ref}, {}, 1)
    out = lineage.render(f"s3://{ours}/artifacts/base")
    assert f"artifacts/train  [stage train]  digest {runs[0]['digest'][:16]}  manifest version {runs[0]['manifest']}" in out

    _put_artifact(fs, ours, "artifacts/base", {"checkpoint": {**ref, "sha256": _sha(b"model 2")}}, {}, 2)
    with pytest.raises(lineage.LineageError, match="recorded version is not the bytes it fetched"):
        lineage.render(f"s3://{ours}/artifacts/base")


def test_lineage_with_no_stored_version_of_an_input_stops_with_one_line(fs, s3_store):
    prefix = f"neon/unpushed-{uuid.uuid4().hex[:8]}"
    _push_run(fs, prefix, 1)
    lost = _sha(b"a base that was never pushed")
    merged = {"artifact": "artifacts/merged", "stage": "merge", "params": {}, "files": {}, "digest": _sha(b"m"),
              "inputs": {"base": {"path": "artifacts/base", "digest": lost}}}
    fs.pipe_file(f"{prefix}/artifacts/merged/manifest.json", json.dumps(merged).encode())
    env = {**os.environ, **store.s3_env(s3_store.endpoint)}
    proc = run([str(BIN / "neon"), "lineage", f"s3://{prefix}/artifacts/merged"], BIN, env, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"artifacts/base/manifest.json has digest {lost}" in proc.stderr
    assert "`base`" in proc.stderr and "dvc push" in proc.stderr
    with pytest.raises(lineage.LineageError, match="two version ids"):
        lineage.render(f"s3://{prefix}/x?versionId=a", version_id="b")


def test_local_lineage_marks_an_input_that_is_not_the_recorded_one(tmp_path):
    """A checkout holds one version: the walk still shows it, and says when it is not the one recorded."""
    def write(artifact: str, digest: str, inputs: dict) -> None:
        (tmp_path / artifact).mkdir(parents=True)
        (tmp_path / artifact / "manifest.json").write_text(json.dumps(
            {"artifact": artifact, "stage": "x", "params": {}, "inputs": inputs, "files": {}, "digest": digest}))
    write("artifacts/base", _sha(b"rerun base"), {})
    write("artifacts/merged", _sha(b"m"), {"base": {"path": "artifacts/base", "digest": _sha(b"old base")}})
    out = lineage.render(str(tmp_path / "artifacts/merged"))
    assert f"! not the version its consumer used (that recorded digest {_sha(b'old base')[:16]})" in out
    with pytest.raises(lineage.LineageError, match="needs an s3:// URI"):
        lineage.render(str(tmp_path / "artifacts/merged"), version_id="v")


def _locked_versions(root) -> dict[str, str]:
    """`artifacts/.../file` -> the S3 version id DVC recorded in dvc.lock when it pushed the file."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {f"{out['path']}/{f['relpath']}": f["cloud"]["store"]["version_id"]
            for stage in lock["stages"].values() for out in stage.get("outs", [])
            for f in out.get("files", []) if f.get("cloud")}


def _make_latest(fs, versions: dict[str, str]) -> None:
    """Copy each recorded version over its key, so the bucket's latest is that run again for later tests."""
    for path, version in versions.items():
        key = f"neon/dvc/{path}"
        if fs.info(key, refresh=True).get("VersionId") != version:
            fs.cp_file(f"{key}?versionId={version}", key)


def test_lineage_of_the_first_of_two_pushed_runs_by_version_id(reproduced, fs):
    root, env, _ = reproduced
    run(["dvc", "push"], root, env)  # earlier tests may have restored a dvc.lock without the version ids
    first = _locked_versions(root)
    first_selftrained = json.loads((root / "artifacts/selftrained/manifest.json").read_text())["digest"]
    uri = f"{MERGED_W1}?versionId={first['artifacts/merged/model.safetensors']}"
    try:
        with restored(root, env):
            set_params(root, **{"finetune.seed": 2})  # new self-trained and merged weights (sample is reused)
            run(["dvc", "repro", "merge"], root, env)
            run(["dvc", "push"], root, env)
            second_selftrained = json.loads((root / "artifacts/selftrained/manifest.json").read_text())["digest"]
            second = _locked_versions(root)["artifacts/merged/model.safetensors"]
        assert second_selftrained != first_selftrained and second != first["artifacts/merged/model.safetensors"]

        older = run(["neon", "lineage", uri], root, env).stdout
        assert first_selftrained[:16] in older and second_selftrained[:16] not in older
        latest = run(["neon", "lineage", MERGED_W1], root, env).stdout
        assert second_selftrained[:16] in latest and first_selftrained[:16] not in latest
    finally:
        _make_latest(fs, first)
