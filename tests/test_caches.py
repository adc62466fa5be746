"""The caches that let a rerun skip work (per-w evaluations, sample shards) are keyed by everything that
changes the work: a changed param or an edited module is measured again, never answered from the cache."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from stages import code, evaluate, params, sample
from tests.conftest import REPO, TINY, run_stages

# The paper's 2D toy runs the same stages and caches as images, in seconds.
FAST = {"model.family": "toy_diffusion", "data.source": "toy2d", "data.limit": 300, "reference.inception_n": 0,
        "train.steps": 30, "train.batch_size": 300, "evaluate.n": 100, "evaluate.inception_n": 0,
        "evaluate.refine": 0, "evaluate.bootstrap": 0, "evaluate.seeds": 2}


def tiny(**changes) -> params.Params:
    return params.parse(params.with_overrides(yaml.safe_load(TINY.read_text()), {**FAST, **changes}))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The stages up to finetune, run in-process in a folder of their own."""
    folder = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        run_stages(tiny(), last="finetune")
    return folder


def evaluate_lines(p: params.Params, capsys) -> tuple[list[str], dict]:
    """The sweep's measurement lines (seed run 0: one per model, none repeated within a run) and the result."""
    evaluate.run(p.evaluate, p.sample, p.model, p.merge)
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("[evaluate] w = ") and "seed run 0:" in line]
    return lines, json.loads(open("artifacts/evaluate/evaluation.json").read())


def edited_copy(tmp_path, relative: str):
    """The project's code with one file edited (a comment appended): what a code fix looks like to a key."""
    for package in code.PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / relative, "a") as f:
        f.write("\n# a fix\n")
    return tmp_path


def test_evaluation_cache_hits_only_when_nothing_it_reads_changed(pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(pipeline)
    first, result = evaluate_lines(tiny(), capsys)
    assert first and not any(line.endswith("cached") for line in first)
    again, same = evaluate_lines(tiny(), capsys)
    assert again and all(line.endswith("cached") for line in again)
    assert same["confirm"] == result["confirm"]

    reseeded, other = evaluate_lines(tiny(**{"evaluate.seed": 7}), capsys)
    assert not any(line.endswith("cached") for line in reseeded), "evaluate.seed must key the cache"
    assert other["confirm"]["raw"]["base"]["fid_runs"] != result["confirm"]["raw"]["base"]["fid_runs"]

    monkeypatch.setattr(code, "ROOT", edited_copy(tmp_path, "models/toy.py"))  # the family's sampler
    edited, _ = evaluate_lines(tiny(), capsys)
    assert not any(line.endswith("cached") for line in edited), "a sampler edit must not be answered from the cache"


def test_sample_shards_are_keyed_by_the_sampling_code(tmp_path, monkeypatch):
    p = tiny().sample
    keyed = sample.work_dir("base-digest", p.model_dump())
    assert sample.work_dir("base-digest", p.model_dump()) == keyed
    monkeypatch.setattr(code, "ROOT", edited_copy(tmp_path, "models/sampling.py"))
    assert sample.work_dir("base-digest", p.model_dump()) != keyed


def test_merge_writes_the_chosen_model_and_on_request_every_sweep_weight(pipeline, monkeypatch):
    """merge.w: best writes the evaluation's w; keep_sweep adds one checkpoint per sweep weight, the chosen one's
    bytes under both names; each equals the in-memory merge."""
    import torch

    from models import checkpoint
    from models.merge import merge as merged_in_memory
    from stages import merge

    monkeypatch.chdir(pipeline)
    p = tiny(**{"merge.keep_sweep": True, "merge.w": 0.5})
    evaluate.run(p.evaluate, p.sample, p.model, p.merge)
    manifest = merge.run(p.merge)
    assert manifest["neon"]["w"] == 0.5 and manifest["neon"]["chosen_by"] == "merge.w"
    assert set(manifest["files"]) == {"model.safetensors", *(merge.merged_name(w) for w in p.merge.weights)}
    folder = pipeline / "artifacts/merged"
    assert (folder / "model.safetensors").read_bytes() == (folder / merge.merged_name(0.5)).read_bytes()
    base, _ = checkpoint.read(pipeline / "artifacts/base/model.safetensors")
    tuned, _ = checkpoint.read(pipeline / "artifacts/selftrained/model.safetensors")
    for w in p.merge.weights:
        got, meta = checkpoint.read(folder / merge.merged_name(w))
        assert float(meta["neon_w"]) == w
        want = merged_in_memory(base, tuned, w)
        assert all(torch.equal(got[k], want[k]) for k in want)
