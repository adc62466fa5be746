"""An experiment run in one clone is pushed and pulled into another, through the embedded store.

DVC cannot push several revisions to a version-aware remote, so `dvc exp push` to the default remote
fails; experiments go through the second, content-addressed remote `exps` (.dvc/config).
"""
from __future__ import annotations

import hashlib
import shutil

from tests.conftest import run

GIT = ["git", "-c", "user.email=t@localhost", "-c", "user.name=t"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_experiment_pushed_from_one_clone_is_pulled_into_another(reproduced, tmp_path):
    root, env, _ = reproduced
    one = tmp_path / "one"
    run(["git", "clone", "--quiet", str(root), str(one)], tmp_path, env)
    shutil.copyfile(root / ".dvc" / "config.local", one / ".dvc" / "config.local")
    shutil.copyfile(root / "dvc.lock", one / "dvc.lock")  # the first run's record, as a team commits it
    run(GIT + ["add", "dvc.lock"], one, env)
    run(GIT + ["commit", "--quiet", "-m", "the first run's dvc.lock"], one, env)
    run(["dvc", "pull", "--quiet"], one, env)

    # --temp: in a copy under .dvc/tmp/exps, with this clone's store and Prefect server (stages.store.services_root)
    proc = run(["dvc", "exp", "run", "--temp", "--name", "seed2", "--set-param", "finetune.seed=2"], one, env)
    out = proc.stdout + proc.stderr
    assert "Running stage 'finetune'" in out and "Running stage 'merge'" in out and "Running stage 'train'" not in out
    assert "Model family: edm." in out
    run(["dvc", "exp", "apply", "seed2"], one, env)
    run(["dvc", "checkout", "--quiet"], one, env)
    model = _sha(one / "artifacts/merged/model.safetensors")
    assert model != _sha(root / "artifacts/merged/model.safetensors")

    team = tmp_path / "team.git"
    run(["git", "init", "--quiet", "--bare", str(team)], tmp_path, env)
    run(["git", "remote", "add", "team", str(team)], one, env)
    run(GIT + ["push", "--quiet", "team", "HEAD:main"], one, env)
    versioned = run(["dvc", "exp", "push", "team", "seed2"], one, env, check=False)  # the default remote
    assert versioned.returncode != 0
    assert "Multiple rev push is unsupported for cloud versioned remotes" in versioned.stdout + versioned.stderr
    run(["dvc", "exp", "push", "--remote", "exps", "team", "seed2"], one, env)
    status = run(["dvc", "status", "--cloud"], one, env, check=False)
    assert "'status' is unsupported for cloud versioned remotes" in status.stdout + status.stderr
    assert "in sync" in run(["dvc", "status", "--cloud", "--remote", "exps"], one, env).stdout

    # The committed Neon model, as another project gets it: the artifact dvc.yaml declares, from the store.
    got = tmp_path / "got"
    run(GIT + ["tag", "-a", "neon-model@v1.0.0", "-m", "the first Neon model"], one, env)  # a version, as GTO tags it
    run(["dvc", "artifacts", "get", str(one), "neon-model", "-o", str(got), "--config",
         str(one / ".dvc" / "config.local")], tmp_path, env)
    assert _sha(got / "model.safetensors") == _sha(root / "artifacts/merged/model.safetensors")
    assert "neon" in __import__("json").loads((got / "manifest.json").read_text())

    two = tmp_path / "two"
    run(["git", "clone", "--quiet", "--branch", "main", str(team), str(two)], tmp_path, env)
    shutil.copyfile(root / ".dvc" / "config.local", two / ".dvc" / "config.local")
    assert "seed2" in run(["dvc", "exp", "list", "origin"], two, env).stdout
    run(["dvc", "exp", "pull", "--remote", "exps", "origin", "seed2"], two, env)
    run(["dvc", "exp", "apply", "seed2"], two, env)
    run(["dvc", "checkout", "--quiet"], two, env)
    assert _sha(two / "artifacts/merged/model.safetensors") == model
    import yaml

    assert yaml.safe_load((two / "params.yaml").read_text())["finetune"]["seed"] == 2
