"""Prefect flows that run the stages. Offline, project-local Prefect settings are set here, before
Prefect is imported, so they are part of the project rather than of anyone's shell."""
import os
from pathlib import Path


def _root() -> Path:
    """The checkout the pipeline runs in: NEON_ROOT when set (a worker's checkout), else the current
    directory when it holds dvc.yaml (`dvc repro` runs each stage there; a Prefect pull step changes
    into it), else the folder above this package (an editable install, run from anywhere)."""
    if explicit := os.environ.get("NEON_ROOT"):
        return Path(explicit).resolve()
    if (Path.cwd() / "dvc.yaml").is_file():
        return Path.cwd().resolve()
    return Path(__file__).resolve().parent.parent


ROOT = _root()

_PREFECT_DEFAULTS = {
    "PREFECT_HOME": str(ROOT / ".neon" / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(ROOT / ".neon" / "prefect" / "results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "INFO",
}
for _key, _value in _PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
# Prefect creates its home without parents; make sure `.neon/` exists on a fresh checkout.
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
if not os.environ.get("PREFECT_API_URL"):  # use the project's local server (`neon prefect up`) when one runs
    from flows.server import running as _running

    if _url := _running(Path(os.environ["PREFECT_HOME"])):
        os.environ["PREFECT_API_URL"] = _url
