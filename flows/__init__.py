"""Prefect flows that run the stages. Offline, project-local Prefect settings are set here, before
Prefect is imported, so they are part of the project rather than of anyone's shell.

Which local services a process uses, the Prefect server of `neon prefect up` (`.neon/prefect`) and the
store of `neon store up` (`.neon/store`), is `SERVICES` (`stages.store.services_root`): the checkout itself,
or, in a DVC experiment's temporary workspace (`<repo>/.dvc/tmp/exps/...`, where `dvc exp run --temp`
runs the stages), the repository `<repo>` the experiment was started from; NEON_SERVICES_ROOT overrides
both. So a stage in an experiment uses the running server and store instead of starting a temporary
Prefect server or reaching for AWS. Importing this package imports no Prefect.
"""
import os
import sys
from pathlib import Path


def _resolved(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except (OSError, RuntimeError):
        return None


# Prefect runs a deployment's entry point (flows/pipeline.py) by loading the script from its path, which puts
# this folder first on sys.path and leaves it there; flows/stages.py would then stand in for the `stages`
# package in every later import of the flow run, this module's own included. The modules here are only ever
# imported as `flows.*`, so that entry goes.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if _resolved(entry) != _HERE]

from stages.store import services_root  # noqa: E402


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
SERVICES = services_root(ROOT)

_PREFECT_DEFAULTS = {
    "PREFECT_HOME": str(SERVICES / ".neon" / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(SERVICES / ".neon" / "prefect" / "results"),
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
