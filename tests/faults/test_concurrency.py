"""Two runs of one stage at once (two processes, same outputs; with and without DVC) leave one valid result,
never a mix, and neither deletes the other's files in progress."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from stages.artifacts import ArtifactWriter, verify
from stages.common import SYNTHETIC, WORK
from tests.conftest import restored, run
from tests.faults.conftest import REPO, stage_process

CHANGES = {"sample.n": 96, "sample.shard_size": 16, "sample.batch_size": 16}


def test_two_sample_runs_at_once_publish_one_complete_set(workspace):
    solo = stage_process("sample.run(p.sample, p.model)", workspace, **CHANGES)
    assert solo.wait(timeout=300) == 0, solo.stdout.read()
    expected = verify(SYNTHETIC)["digest"]

    runs = [stage_process("sample.run(p.sample, p.model)", workspace, **CHANGES) for _ in range(2)]
    outs = [r.communicate(timeout=300)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    assert verify(SYNTHETIC)["digest"] == expected
    assert not list(SYNTHETIC.parent.glob(".synthetic.*")), "a staging or old folder was left behind"
    assert not list(WORK.glob("sample/*")), "the shared work folder outlived both runs"


HOLD = r"""
import sys, time
from pathlib import Path
from stages.artifacts import artifact
with artifact(Path("artifacts/thing"), "test", {}, {}) as out:
    out.path("part").write_text("in progress")
    Path("ready").touch()
    while not Path("go").exists():
        time.sleep(0.01)
"""


def test_a_writer_removes_only_staging_folders_whose_writer_is_gone(tmp_path):
    (tmp_path / "artifacts").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                              start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.01)
    (staging,) = (tmp_path / "artifacts").glob(".thing.staging-*")

    other = ArtifactWriter(tmp_path / "artifacts" / "thing", "test", {}, {}, "cpu")
    assert (staging / "part").read_text() == "in progress", "a live run's staging folder was deleted"
    other.discard()

    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert staging.exists()  # what a killed run leaves ...
    ArtifactWriter(tmp_path / "artifacts" / "thing", "test", {}, {}, "cpu").discard()
    assert not staging.exists()  # ... the next writer removes


def test_two_dvc_repro_at_once_leave_one_valid_result(reproduced):
    root, env, _ = reproduced
    with restored(root, env):
        before = verify(root / "artifacts" / "synthetic")["digest"]
        procs = [subprocess.Popen(["dvc", "repro", "--force", "--single-item", "sample"], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        codes = [p.returncode for p in procs]
        assert 0 in codes, outs
        for code, out in zip(codes, outs):  # DVC's repository lock turns the second run away, with its reason
            assert code == 0 or "lock" in out.lower(), out
        assert verify(root / "artifacts" / "synthetic")["digest"] == before
        status = run(["dvc", "status", "sample"], root, env).stdout
        assert "changed" not in status and "modified" not in status, status
