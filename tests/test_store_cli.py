"""`neon store env` and `neon store put`: a user's own files into the embedded store, as a new user would."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict

import torch

from models import checkpoint
from stages.artifacts import directory_digest, sha256_file
from tests.conftest import BIN


def _root_with_store(tmp_path, info):
    """A checkout whose .neon/store describes the session's running store (what `neon store up` writes)."""
    (tmp_path / ".neon" / "store").mkdir(parents=True)
    (tmp_path / ".neon" / "store" / "store.json").write_text(json.dumps(asdict(info)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # a fresh shell: no credentials
    return env | {"NEON_ROOT": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}"}


def test_store_env_lets_a_shell_reach_the_store_with_its_credentials(s3_store, tmp_path):
    env = _root_with_store(tmp_path, s3_store)
    listing = subprocess.run(
        ["bash", "-c", 'eval "$(neon store env)" && python -c "import s3fs; print(s3fs.S3FileSystem().ls(\'neon\'))"'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]  # was NoCredentialsError before `env` exported the keys
    assert listing.stdout.strip().startswith("[")


def test_store_put_uploads_a_checkpoint_and_prints_the_params_that_pin_it(s3_store, tmp_path):
    env = _root_with_store(tmp_path, s3_store)
    path = tmp_path / "mine.safetensors"
    checkpoint.save(path, {"w": torch.arange(6.0)}, "edm", {"image_shape": [1, 4, 4]})
    out = subprocess.run(["neon", "store", "put", str(path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "base.checkpoint: s3://neon/inputs/mine.safetensors" in out.stdout
    assert f"base.sha256: {sha256_file(path)}" in out.stdout

    folder = tmp_path / "digits"
    for cls in ("0", "1"):
        (folder / cls).mkdir(parents=True)
        (folder / cls / "a.png").write_bytes(f"not really a png {cls}".encode())
    out = subprocess.run(["neon", "store", "put", str(folder), "s3://neon/inputs/digits"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    want = directory_digest({f"{c}/a.png": sha256_file(folder / c / "a.png") for c in ("0", "1")})
    assert f"folder digest {want}" in out.stdout and "data.source: s3://neon/inputs/digits/" in out.stdout
