"""A long-lived local Prefect API server (127.0.0.1), so each stage's flow skips the ~5-10 s start of
a temporary one. `neon prefect up` starts it; flows find it through `.neon/prefect/server.json` in the
checkout whose services they use (`flows.SERVICES`: also from a DVC experiment's temporary workspace)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from stages.store import free_port_pair, process_alive as _alive

STATE = "server.json"


def running(home: Path) -> str | None:
    """The API URL of a live server started for this PREFECT_HOME, if any: its process is alive and its
    port takes connections (a pid reused after a reboot is not a server). No HTTP request: ~1 ms."""
    path = Path(home) / STATE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info["url"] if _alive(info["pid"]) and _listening(info["url"]) else None


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=1):
            return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(home: Path, timeout: float = 180) -> str:
    home = Path(home)
    if url := running(home):
        return url
    home.mkdir(parents=True, exist_ok=True)
    port = free_port_pair(26000)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
    prefect = str(Path(sys.executable).with_name("prefect"))
    with open(home / "server.log", "ab") as log:
        proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"Prefect server did not start within {timeout:.0f}s; see {home / 'server.log'}")
        time.sleep(0.5)
    tmp = home / f"{STATE}.tmp"
    tmp.write_text(json.dumps({"pid": proc.pid, "url": url}))
    tmp.replace(home / STATE)
    return url


def stop(home: Path, timeout: float = 30) -> bool:
    path = Path(home) / STATE
    if not path.exists():
        return False
    pid = json.loads(path.read_text())["pid"]
    if _alive(pid):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True
