"""SIGKILL `sample` at several points: the rerun keeps the intact shards, draws the rest, and publishes
the same bytes as an uninterrupted run."""
from __future__ import annotations

import shutil

import pytest

from stages import sample
from stages.artifacts import SEAL_SUFFIX, read_manifest, verify
from stages.common import SYNTHETIC, WORK
from tests.faults.conftest import flip_byte, kill_when, stage_process, tiny_params

# 6 shards of 16 images: enough kill points, a second of sampling each.
CHANGES = {"sample.n": 96, "sample.shard_size": 16, "sample.batch_size": 16}
CALL = "sample.run(p.sample, p.model)"


def sealed_shards() -> int:
    return len(list((WORK / "sample").glob(f"*/shard-*.npz{SEAL_SUFFIX}")))


@pytest.fixture
def uninterrupted(workspace):
    """The synthetic set's digest from one run that nobody killed (then the folder is put back)."""
    p = tiny_params(**CHANGES)
    digest = sample.run(p.sample, p.model)["digest"]
    shutil.rmtree(SYNTHETIC)
    return digest


@pytest.mark.parametrize("kill_after", [1, 4])
def test_a_killed_sample_run_resumes_and_publishes_identical_bytes(uninterrupted, workspace, kill_after):
    shutil.rmtree(WORK, ignore_errors=True)
    proc = stage_process(CALL, workspace, **CHANGES)
    assert kill_when(proc, lambda: sealed_shards() >= kill_after), "sampling finished before the kill"
    assert not SYNTHETIC.exists(), "a killed run published a synthetic set"
    kept = sealed_shards()
    assert kept >= kill_after

    rerun = stage_process(CALL, workspace, **CHANGES)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"({kept} already complete" in out
    assert verify(SYNTHETIC)["digest"] == uninterrupted
    assert not list(WORK.glob("sample/*")), "the work folder outlived the published set"
    assert not list(SYNTHETIC.parent.glob(".synthetic.*")), "a staging folder was left behind"


def test_a_kill_while_publishing_leaves_the_old_set_or_the_new_one(uninterrupted, workspace):
    """Killed once every shard is drawn (while copying and publishing): never a half-written set."""
    shutil.rmtree(WORK, ignore_errors=True)
    proc = stage_process(CALL, workspace, **CHANGES)
    killed = kill_when(proc, lambda: any(SYNTHETIC.parent.glob(".synthetic.staging-*/shard-*")))
    if SYNTHETIC.exists():  # the kill came after the rename: then it is the complete set
        assert verify(SYNTHETIC)["digest"] == uninterrupted
    rerun = stage_process(CALL, workspace, **CHANGES)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    if killed:
        assert "(6 already complete" in out
    assert verify(SYNTHETIC)["digest"] == uninterrupted


def test_a_corrupted_work_shard_is_drawn_again_not_published(uninterrupted, workspace, capsys):
    p = tiny_params(**CHANGES)
    proc = stage_process(CALL, workspace, **CHANGES)
    assert kill_when(proc, lambda: sealed_shards() >= 2)
    shard = sorted((WORK / "sample").glob(f"*/shard-*.npz{SEAL_SUFFIX}"))[0].with_suffix("")
    flip_byte(shard, offset=200)
    manifest = sample.run(p.sample, p.model)
    assert f"{shard} does not match its recorded digest (corrupted): drawing it again" in capsys.readouterr().out
    assert manifest["digest"] == uninterrupted
    assert read_manifest(SYNTHETIC)["files"] == verify(SYNTHETIC)["files"]
