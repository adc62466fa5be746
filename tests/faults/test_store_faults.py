"""Object-store faults against a real SeaweedFS of this module's own (it is stopped and killed here).

A stage reading S3 while the store is down fails within seconds with one line naming the endpoint, what
it was reading and the fix; `neon store up` brings the store back on the same endpoint and the same
command completes. A `dvc push` cut off by the store dying leaves no partial object under its key, and
completes after the restart.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import store
from tests.conftest import BIN, REPO, TINY, run

pytestmark = pytest.mark.e2e

DEAD_STORE_BOUND_S = 15  # the defaults (3 attempts, backoff <= 1 s + 2 s) fail a refused endpoint in ~3-5 s


def _secrets() -> list[str]:
    return list(store.credentials().values())


@pytest.fixture(scope="module")
def own_store(tmp_path_factory):
    """(state dir, endpoint) of a store only this module uses; its tests stop, kill and restart it."""
    state = tmp_path_factory.mktemp("fault-store")
    info = store.start(state)
    yield state, info.endpoint
    if store.read_info(state) is not None:
        _kill(state)  # faster than a clean stop, and nothing here needs the data


@pytest.fixture
def store_env(own_store, monkeypatch, tmp_path):
    """The S3 client's environment pointed at the module's store (running), NEON_S3_* at their defaults."""
    state, endpoint = own_store
    _up(state, endpoint)
    for name in store.S3_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for k, v in store.s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    return state, endpoint


def _up(state: Path, endpoint: str) -> None:
    info = store.start(state)
    assert info.endpoint == endpoint, "a restart must serve the endpoint .dvc/config.local and the env name"


def _kill(state: Path) -> None:
    """SIGKILL the store's process group (no clean shutdown) and wait until it is gone."""
    info = store.read_info(state)
    assert info is not None
    os.killpg(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while store.process_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _assert_one_clear_line(message: str, endpoint: str, what: str) -> None:
    assert "\n" not in message
    assert f"cannot reach the S3 store at {endpoint}" in message
    assert what in message and "neon store up" in message and "AWS_ENDPOINT_URL_S3" in message
    assert not any(secret in message for secret in _secrets())


def _tiny_checkpoint(path: Path) -> None:
    from models import checkpoint, family as families

    cfg = {"channels": [8, 16], "emb_dim": 16, "dropout": 0.0, "sigma_data": 0.5, "label_dim": 0,
           "image_shape": [1, 28, 28]}
    checkpoint.save(path, families.get("edm").build(cfg).state_dict(), "edm", cfg)


def _one_error_line(proc: subprocess.Popen, out: str, err: str, endpoint: str, what: str) -> None:
    """A command's output: exit 1, exactly one `error:` line (the clear one), no traceback, no credentials."""
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    _assert_one_clear_line(errors[0], endpoint, what)
    assert "Traceback" not in err
    assert not any(secret in out + err for secret in _secrets())


def test_fetch_with_the_store_down_fails_in_seconds_then_completes_after_restart(store_env, tmp_path, prefect_api):
    from stages import data, fetch
    from stages.params import BaseParams, DataParams, ModelParams

    state, endpoint = store_env
    data.run(DataParams(source="mnist", limit=32))  # the data shape the fetched checkpoint is checked against
    _tiny_checkpoint(tmp_path / "upload.safetensors")
    blob = (tmp_path / "upload.safetensors").read_bytes()
    uri = f"s3://neon/faults-{uuid.uuid4().hex[:8]}/model.safetensors"
    store.filesystem().pipe_file(uri[len("s3://"):], blob)
    base = BaseParams(checkpoint=uri, sha256=hashlib.sha256(blob).hexdigest())
    params = yaml.safe_load(TINY.read_text())
    params["base"] = {"checkpoint": uri, "sha256": base.sha256}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    store.stop(state)  # `neon store down`
    # The stage's command and `neon lineage` (started first: they overlap the in-process call below).
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    commands = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for cmd in ([sys.executable, "-m", "flows", "fetch"], [str(BIN / "neon"), "lineage", uri])]
    try:
        t0 = time.monotonic()
        with pytest.raises(store.StoreUnavailableError) as caught:
            fetch.run(base, ModelParams())
        assert time.monotonic() - t0 < DEAD_STORE_BOUND_S
        _assert_one_clear_line(str(caught.value), endpoint, f"base.checkpoint {uri}")
        out, err = commands[0].communicate(timeout=120)
        _one_error_line(commands[0], out, err, endpoint, f"base.checkpoint {uri}")
        out, err = commands[1].communicate(timeout=120)  # stages/lineage.py words its own line
        assert commands[1].returncode == 1 and "Traceback" not in err, err[-3000:]
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err[-3000:]
        assert "neon store up" in err and not any(secret in out + err for secret in _secrets())
    finally:
        for proc in commands:
            proc.kill()
            proc.wait()

    _up(state, endpoint)  # `neon store up`: the same endpoint, so the same command completes
    manifest = fetch.run(base, ModelParams())
    assert (tmp_path / "artifacts/base/model.safetensors").read_bytes() == blob
    assert manifest["inputs"]["checkpoint"]["version_id"]


def test_data_read_with_the_store_down_fails_in_seconds_then_completes_after_restart(store_env, tmp_path):
    from stages import data
    from stages.params import DataParams

    state, endpoint = store_env
    fs = store.filesystem()
    prefix = f"neon/faults-{uuid.uuid4().hex[:8]}/digits"
    rng = np.random.default_rng(0)
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(buf, format="PNG")
        fs.pipe_file(f"{prefix}/{i % 3}/img{i}.png", buf.getvalue())
    source = DataParams(source=f"s3://{prefix}")

    _kill(state)  # no clean shutdown this time
    t0 = time.monotonic()
    with pytest.raises(store.StoreUnavailableError) as caught:
        data.run(source)
    assert time.monotonic() - t0 < DEAD_STORE_BOUND_S
    _assert_one_clear_line(str(caught.value), endpoint, f"data.source s3://{prefix}")
    assert not Path("artifacts/data/images.npz").exists()

    _up(state, endpoint)
    manifest = data.run(source)
    assert manifest["data"]["count"] == 12 and manifest["data"]["classes"] == 3


def test_a_hung_store_times_out_within_the_configured_bound(store_env, monkeypatch):
    """A store that accepts connections but never answers (SIGSTOP): the read timeout bounds every try."""
    from stages import sources

    state, endpoint = store_env
    monkeypatch.setenv("NEON_S3_RETRIES", "2")
    monkeypatch.setenv("NEON_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("NEON_S3_READ_TIMEOUT", "1")
    pid = store.read_info(state).pid
    os.killpg(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(store.StoreUnavailableError) as caught:
            sources.read_images("s3://neon/anything")
        # s3fs tries twice x 2 attempts x (1 s timeout + backoff <= 1 s): about 5 s
        assert time.monotonic() - t0 < 10
    finally:
        os.killpg(pid, signal.SIGCONT)
    _assert_one_clear_line(str(caught.value), endpoint, "data.source s3://neon/anything")
    monkeypatch.setenv("NEON_S3_RETRIES", "lots")
    with pytest.raises(store.S3SettingError, match="NEON_S3_RETRIES='lots' is not an integer 1-20"):
        store.filesystem()


# --- dvc push cut off by the store dying ------------------------------------------------------------

class _Proxy:
    """A TCP relay to the store that SIGKILLs the store once `after` bytes of requests went through, so
    that it dies in the middle of an upload, at a point the test chooses. While the store is dead the
    relay's port refuses connections too, as the store's own would; `reopen` after the restart."""

    def __init__(self, upstream_port: int, after: int, kill):
        self.upstream, self.after, self.kill = upstream_port, after, kill
        self.sent, self.killed_at = 0, None
        self.lock = threading.Lock()
        self.port = 0
        self.reopen()

    def reopen(self):
        self.server = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server):
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, counts: bool):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if counts:
                    with self.lock:
                        self.sent += len(data)
                        if self.killed_at is None and self.sent >= self.after:
                            self.killed_at = self.sent
                            self.kill()
                            self.close()
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self):
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.server.close()


def _versions(fs, prefix: str) -> list[dict]:
    """Every version of every object under `prefix` (bucket/key...), with its full "bucket/key" as `Path`."""
    fs.invalidate_cache()
    bucket = prefix.split("/", 1)[0]
    return [{**v, "Path": f"{bucket}/{v['Key']}"} for key in fs.find(prefix) for v in fs.object_version_info(key)]


def test_dvc_push_cut_off_by_the_store_dying_leaves_no_partial_object_and_completes_after_restart(
        store_env, tmp_path):
    state, endpoint = store_env
    fs = store.filesystem()
    prefix = f"neon/faults-{uuid.uuid4().hex[:8]}"
    size = 6 * 2**20
    payload = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    proxy = _Proxy(int(endpoint.rsplit(":", 1)[1]), after=size // 2, kill=lambda: _kill(state))
    root = tmp_path / "repo"
    root.mkdir()
    creds = store.credentials()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
    env.pop("PYTHONPATH", None)
    git = ["git", "-c", "user.email=t@localhost", "-c", "user.name=t"]
    try:
        run(git + ["init", "-q"], root, env)
        run(["dvc", "init", "-q"], root, env)
        (root / ".dvc" / "config").write_text(
            "[core]\n    remote = store\n    analytics = false\n    autostage = true\n"
            f"['remote \"store\"']\n    url = s3://{prefix}/dvc\n    version_aware = true\n")
        (root / ".dvc" / "config.local").write_text(
            f"['remote \"store\"']\n    endpointurl = http://127.0.0.1:{proxy.port}\n"
            f"    access_key_id = {creds['AWS_ACCESS_KEY_ID']}\n"
            f"    secret_access_key = {creds['AWS_SECRET_ACCESS_KEY']}\n")
        (root / "weights.bin").write_bytes(payload)
        run(["dvc", "add", "-q", "weights.bin"], root, env)
        run(git + ["add", "-A"], root, env)
        run(git + ["commit", "-qm", "tracked weights"], root, env)

        t0 = time.monotonic()
        cut = run(["dvc", "push"], root, env, check=False)
        assert cut.returncode != 0, cut.stdout + cut.stderr
        assert proxy.killed_at is not None and proxy.killed_at < size, "the store did not die mid-upload"
        assert time.monotonic() - t0 < 30
        assert not any(secret in cut.stdout + cut.stderr for secret in _secrets())

        _up(state, endpoint)  # same ports: the relay (DVC's endpoint) reaches the store again
        proxy.reopen()
        md5 = hashlib.md5(payload).hexdigest()
        for v in _versions(fs, prefix):  # whatever landed is whole; nothing half-written under the final key
            assert v["Size"] == size, v
            assert hashlib.md5(fs.cat_file(v["Path"], version_id=v["VersionId"])).hexdigest() == md5

        run(["dvc", "push"], root, env)
        versions = _versions(fs, prefix)
        assert versions and all(v["Size"] == size for v in versions)
        assert [v["Path"] for v in versions if v.get("IsLatest")] == [f"{prefix}/dvc/weights.bin"]

        # The pushed .dvc file records the version; a fresh clone pulls exactly those bytes.
        run(git + ["commit", "-qam", "pushed"], root, env)
        clone = tmp_path / "clone"
        run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
        shutil.copyfile(root / ".dvc" / "config.local", clone / ".dvc" / "config.local")
        run(["dvc", "pull"], clone, env)
        assert (clone / "weights.bin").read_bytes() == payload
    finally:
        proxy.close()


def test_the_four_services_get_distinct_port_pairs_even_when_the_random_starts_line_up(tmp_path, monkeypatch):
    """Each service probes from its own base plus a random start; two starts 1,000 apart used to land two
    services on one port, and start() then failed with "port collision ...; retry"."""
    starts = iter([5000, 4000, 3000, 2000])  # master 26000, volume 26000, filer 26000, s3 26000 before the fix
    monkeypatch.setattr(store, "_ephemeral_port", lambda: next(starts))
    monkeypatch.setattr(store, "_port_free", lambda port: True)
    ports = store._choose_ports(tmp_path)
    used = [p + d for p in ports.values() for d in (0, 10000)]  # each service's HTTP and gRPC port
    assert len(set(used)) == len(used), ports
