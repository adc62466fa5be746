"""A stage command prints a user's problem as one line, and lets a bug surface with its traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY

# Runs the real entry point (`python -m flows merge` is `flows.stages.main(["merge"])`) with the stage
# replaced by one that fails the way the test asks.
SCRIPT = """
import sys
import flows.stages as entry
from models.merge import MergeError

def fail(module, params):
    if sys.argv[1] == "merge":
        raise MergeError("tensor `w` holds NaN/inf in the self-trained checkpoint")
    {}["a key the code forgot"]  # a bug

entry.RUNNERS["merge"] = ("stages.merge", fail)
sys.exit(entry.main(["merge"]))
"""


def run_stage(kind: str, folder, prefect_api) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", SCRIPT, kind], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def folder(tmp_path):
    shutil.copyfile(TINY, tmp_path / "params.yaml")
    return tmp_path


def test_input_errors_are_one_line(folder, prefect_api):
    proc = run_stage("merge", folder, prefect_api)
    assert proc.returncode == 1
    assert [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [
        "error: tensor `w` holds NaN/inf in the self-trained checkpoint"]
    assert "Traceback" not in proc.stderr


def test_every_error_a_user_can_fix_is_an_input_error():
    """The entry point prints InputError as one line; these are the project's input problems."""
    from models.checkpoint import CheckpointError
    from models.errors import ConfigError, InputError, NonFiniteError
    from models.merge import MergeError
    from models.metrics import MetricInputError
    from stages.artifacts import ArtifactError, MissingArtifactError
    from stages.common import StageError
    from stages.params import ParamsError

    for error in (CheckpointError, ConfigError, NonFiniteError, MergeError, MetricInputError, ArtifactError,
                  MissingArtifactError, StageError, ParamsError):
        assert issubclass(error, InputError), error
    assert not issubclass(KeyError, InputError) and not issubclass(ValueError, InputError)


def test_a_bug_keeps_its_traceback(folder, prefect_api):
    proc = run_stage("bug", folder, prefect_api)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "KeyError: 'a key the code forgot'" in proc.stderr
    assert not [x for x in proc.stderr.splitlines() if x.startswith("error:")]
