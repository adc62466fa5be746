"""Inputs DVC can see: `neon track` imports a user's images and checkpoint from the (real) store into
inputs/, and a change at the source shows in `dvc status` and reruns what depends on it, without `-f`."""
from __future__ import annotations

import configparser
import io
import json
import os
import re
import shutil
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from models import checkpoint
from stages import inputs, store
from stages.data import _mnist_5k
from tests.conftest import BIN, REPO, restored, run, set_params


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@contextmanager
def _tracking(root: Path, env: dict, info):
    """The project as a user who runs `neon store put` / `neon track` has it, put back afterwards: the imports
    removed, the DVC config and inputs/ as they were, then params, lock and outputs (`restored`)."""
    kept = {p: p.read_bytes() for p in [root / ".dvc" / "config", root / ".dvc" / "config.local",
                                        root / "inputs" / "tracked.yaml"]}
    (root / ".neon" / "store").mkdir(parents=True, exist_ok=True)
    (root / ".neon" / "store" / "store.json").write_text(json.dumps(asdict(info)))
    with restored(root, env):
        try:
            yield
        finally:
            for dvc_file in (root / "inputs").glob("*/*.dvc"):
                run(["dvc", "remove", str(dvc_file.relative_to(root))], root, env, check=False)
            for role in inputs.ROLES:
                for path in (root / "inputs" / role).iterdir():
                    if path.name != "README.md":
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
            for path, data in kept.items():
                path.write_bytes(data)
            (root / ".neon" / "store" / "store.json").unlink()


def test_a_changed_image_or_checkpoint_in_the_store_shows_in_dvc_status_and_reruns_its_stage(reproduced, s3_store,
                                                                                            tmp_path):
    root, env, _ = reproduced
    images, labels, _ = _mnist_5k()
    folder = tmp_path / "digits"
    for i in np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(10)]):  # 40 digits, a folder per class
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        (folder / str(labels[i]) / f"{i}.png").write_bytes(_png(images[i, 0]))
    base = tmp_path / "base.safetensors"
    shutil.copyfile(root / "artifacts" / "train" / "model.safetensors", base)

    with _tracking(root, env, s3_store):
        run(["neon", "store", "put", str(folder), "s3://neon/tracked/digits"], root, env)
        run(["neon", "store", "put", str(base), "s3://neon/tracked/base.safetensors"], root, env)
        out = run(["neon", "track", "data", "s3://neon/tracked/digits"], root, env).stdout
        assert "data.source: inputs/data/digits" in out and "pinned by S3 version ids" in out, out
        out = run(["neon", "track", "base", "s3://neon/tracked/base.safetensors"], root, env).stdout
        assert "base.checkpoint: inputs/base/base.safetensors" in out, out
        # the .dvc files name the store through a remote alias: no endpoint or key in what git keeps
        dvc_file = (root / "inputs" / "data" / "digits.dvc").read_text()
        assert "remote://input-neon/tracked/digits" in dvc_file and "version_id" in dvc_file
        assert "127.0.0.1" not in dvc_file and "secret" not in dvc_file
        assert inputs.tracked(root) == {"data": "inputs/data/digits", "base": "inputs/base/base.safetensors"}

        set_params(root, **{"data.source": "inputs/data/digits", "base.checkpoint": "inputs/base/base.safetensors"})
        run(["dvc", "repro", "data", "fetch"], root, env)
        manifest = json.loads((root / "artifacts" / "data" / "manifest.json").read_text())
        source = manifest["inputs"]["source"]
        assert {k: source["imported_from"][k] for k in ("url", "version_aware", "dvc_file")} == {
            "url": "s3://neon/tracked/digits", "version_aware": True, "dvc_file": "inputs/data/digits.dvc"}
        first_digest = manifest["data"]["content_digest"]
        assert manifest["data"]["count"] == 40 and manifest["data"]["classes"] == 10
        fetched = json.loads((root / "artifacts" / "base" / "manifest.json").read_text())
        assert fetched["inputs"]["checkpoint"]["imported_from"]["url"] == "s3://neon/tracked/base.safetensors"
        assert "changed" not in run(["dvc", "status", "data", "fetch"], root, env).stdout
        events = [json.loads(line) for line in (root / ".neon" / "openlineage" / "events.jsonl").open()]
        data_inputs = [d for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith("data")
                       for d in e["inputs"]]
        assert {"namespace": "s3://neon", "name": "tracked/digits"} in [
            {k: d[k] for k in ("namespace", "name")} for d in data_inputs]  # named where it lives

        # a copy that is not what the .dvc file pins is refused by fetch
        tracked_copy = root / "inputs" / "base" / "base.safetensors"
        pinned = tracked_copy.read_bytes()
        tracked_copy.unlink()  # DVC may have linked it to its cache: replace, never write through
        tracked_copy.write_bytes(pinned[:-1] + bytes([pinned[-1] ^ 1]))
        refused = run(["python", "-m", "flows", "fetch"], root, env, check=False)
        assert refused.returncode != 0 and "inputs/base/base.safetensors.dvc pins" in refused.stderr, refused.stderr[-2000:]
        tracked_copy.unlink()
        tracked_copy.write_bytes(pinned)

        # one image changes in the store (another digit under the same name), and the checkpoint is retrained
        fs = store.filesystem(s3_store.endpoint)
        name = next(p for p in folder.rglob("*.png")).relative_to(folder).as_posix()
        fs.pipe_file(f"neon/tracked/digits/{name}", _png(images[100, 0]))
        tensors, meta = checkpoint.read(base)
        checkpoint.write_state(base, {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}, meta)
        run(["neon", "store", "put", str(base), "s3://neon/tracked/base.safetensors"], root, env)

        status = run(["dvc", "status"], root, env).stdout
        assert "inputs/data/digits.dvc" in status and "modified:" in status and "remote://input-neon/tracked/digits" in status
        assert "inputs/base/base.safetensors.dvc" in status, status

        repro = run(["dvc", "repro", "data", "fetch"], root, env).stdout  # no -f
        assert "Running stage 'data'" in repro and "Running stage 'fetch'" in repro, repro
        manifest = json.loads((root / "artifacts" / "data" / "manifest.json").read_text())
        assert manifest["data"]["count"] == 40 and manifest["data"]["content_digest"] != first_digest
        refetched = json.loads((root / "artifacts" / "base" / "manifest.json").read_text())
        assert refetched["checkpoint"]["sha256"] != fetched["checkpoint"]["sha256"]
        assert "changed" not in run(["dvc", "status", "data", "fetch"], root, env).stdout
        # a version-aware push rewrites dvc.lock; the stages must still look unchanged after it (to a remote
        # of this test's own: the session's `store` keeps the versions the other tests expect)
        run(["dvc", "remote", "add", "pushcheck", "s3://neon/test-inputs-push"], root, env)
        run(["dvc", "remote", "modify", "pushcheck", "version_aware", "true"], root, env)
        for key, value in [("endpointurl", s3_store.endpoint),
                           ("access_key_id", store.credentials()["AWS_ACCESS_KEY_ID"]),
                           ("secret_access_key", store.credentials()["AWS_SECRET_ACCESS_KEY"])]:
            run(["dvc", "remote", "modify", "--local", "pushcheck", key, value], root, env)
        run(["dvc", "push", "-q", "-r", "pushcheck", "artifacts/data", "artifacts/base"], root, env)
        assert "changed" not in run(["dvc", "status", "data", "fetch"], root, env).stdout


def test_a_local_zip_is_tracked_and_its_change_shows_in_dvc_status(tmp_path):
    """A zip outside the project, in a bare git+DVC checkout (no store needed for a local source)."""
    project, archive = tmp_path / "project", tmp_path / "digits.zip"
    project.mkdir()
    env = {**os.environ, "NEON_ROOT": str(project), "PATH": f"{BIN}:{os.environ['PATH']}"}
    run(["git", "init", "-q"], project, env)
    run(["dvc", "init", "-q"], project, env)
    images, _, _ = _mnist_5k()
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            z.writestr(f"{i}.png", _png(images[i, 0]))
    out = run(["neon", "track", "data", str(archive)], project, env).stdout
    assert "data.source: inputs/data/digits.zip" in out and "pinned by checksums" in out
    assert (project / "inputs" / "data" / "digits.zip").read_bytes() == archive.read_bytes()
    assert "changed" not in run(["dvc", "status"], project, env).stdout
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("3.png", _png(images[3, 0]))
    status = run(["dvc", "status"], project, env).stdout
    assert "inputs/data/digits.zip.dvc" in status and re.search(rf"modified:\s+{re.escape(str(archive))}", status), status
    again = run(["neon", "track", "data", str(archive)], project, env, check=False)
    assert again.returncode == 1 and "dvc update inputs/data/digits.zip.dvc" in again.stderr
    # an earlier import is followed again by naming it
    (project / "inputs" / "tracked.yaml").write_text("tracked:\n  data: inputs/data/README.md\n")
    out = run(["neon", "track", "data", "inputs/data/digits.zip"], project, env).stdout
    assert "data.source: inputs/data/digits.zip" in out
    assert "data: inputs/data/digits.zip" in (project / "inputs" / "tracked.yaml").read_text()


def test_a_source_dvc_does_not_follow_gets_a_note_and_an_import_names_its_origin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs" / "data").mkdir(parents=True)
    note = inputs.untracked_note("data", "s3://bucket/cats/")
    assert "neon track data s3://bucket/cats/" in note and "data.source: inputs/data/cats" in note
    assert "neon track base /models/x.safetensors" in inputs.untracked_note("base", "/models/x.safetensors")
    assert "neon track data inputs/data/cats" in inputs.untracked_note("data", "inputs/data/cats")  # not named
    (tmp_path / "inputs" / "tracked.yaml").write_text("tracked:\n  data: inputs/data/cats\n")
    assert inputs.untracked_note("data", "inputs/data/cats") is None
    assert inputs.tracked() == {"data": "inputs/data/cats", "base": "inputs/base/README.md"}

    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("['remote \"input-neon\"']\n    url = s3://neon\n")
    (tmp_path / "inputs" / "data" / "cats.dvc").write_text(
        "deps:\n- path: remote://input-neon/user/cats\n  fs_config:\n    version_aware: true\nouts:\n- path: cats\n")
    assert inputs.imported_from("inputs/data/cats") == {
        "url": "s3://neon/user/cats", "version_aware": True, "dvc_file": "inputs/data/cats.dvc", "md5": None}
    assert inputs.imported_from("inputs/data/dogs") is None


def test_store_up_points_the_pipeline_and_input_remotes_at_the_store_and_leaves_other_endpoints(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "['remote \"store\"']\n    url = s3://neon/dvc\n['remote \"input-neon\"']\n    url = s3://neon\n"
        "['remote \"input-theirs\"']\n    url = s3://theirs\n")
    (tmp_path / ".dvc" / "config.local").write_text(
        "['remote \"input-theirs\"']\nendpointurl = https://minio.example.org\n")
    env = {**os.environ, "NEON_ROOT": str(tmp_path)}
    run([sys.executable, "-c", "from flows import inputs; inputs.write_dvc_local('http://127.0.0.1:4321')"],
        REPO, env)
    local = configparser.ConfigParser()
    local.read(tmp_path / ".dvc" / "config.local")
    for remote in ("store", "exps", "input-neon"):
        assert local[f"'remote \"{remote}\"'"]["endpointurl"] == "http://127.0.0.1:4321"
        assert local[f"'remote \"{remote}\"'"]["access_key_id"] == store.credentials()["AWS_ACCESS_KEY_ID"]
    assert dict(local["'remote \"input-theirs\"'"]) == {"endpointurl": "https://minio.example.org"}
