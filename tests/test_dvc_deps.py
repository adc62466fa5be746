"""dvc.yaml lists exactly the code each stage runs: the closure `stages.code` computes, checked here
against dvc.yaml and against what Python really imports, so a stage can never be called up to date
while a module it runs has changed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from stages import code, inputs
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def code_deps(stage: str) -> list[str]:
    return [d for d in STAGES[stage]["deps"] if d.endswith(".py")]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_exactly_the_stage_code(stage):
    want = list(code.stage_code(stage))
    assert {"flows/__main__.py", "flows/stages.py", f"stages/{stage}.py"} <= set(want)
    assert sorted(code_deps(stage)) == want, (
        f"dvc.yaml stage {stage}: deps must list the code the stage runs:\n  " + ", ".join(want))
    followed = {f"${{tracked.{role}}}": path for role, path in inputs.tracked(REPO).items()}  # dvc.yaml's vars
    for dep in STAGES[stage]["deps"]:
        dep = followed.get(dep, dep)
        assert (REPO / dep).exists() or dep.startswith("artifacts/"), f"{stage}: {dep} does not exist"


# One interpreter for every stage (torch is imported once): project modules are dropped between stages.
IMPORTS = """
import importlib, json, sys
root, out = sys.argv[1], {}
for stage in sys.argv[2:]:
    for name in [n for n in sys.modules if n.split('.')[0] in ('models', 'stages', 'flows')]:
        del sys.modules[name]
    importlib.import_module('stages.' + stage)
    out[stage] = sorted(m.__file__[len(root) + 1:] for m in list(sys.modules.values())
                        if (getattr(m, '__file__', None) or '').startswith(root + '/'))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def imported():
    proc = subprocess.run([sys.executable, "-c", IMPORTS, str(REPO), *STAGES], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("stage", STAGES)
def test_closure_covers_what_python_imports(stage, imported):
    """The static closure is a superset of the project modules that importing the stage really loads."""
    loaded = {p for p in imported[stage] if p.split("/")[0] in code.PACKAGES and (REPO / p).stat().st_size}
    assert loaded, "nothing imported: the check itself is broken"
    assert loaded <= set(code.closure(f"stages.{stage}")), sorted(loaded - set(code.closure(f"stages.{stage}")))


def test_closure_follows_function_level_imports_and_module_names_in_strings(tmp_path):
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from models import b\n")
    (pkg / "b.py").write_text("PLUGINS = ('models.c',)\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from models import d\n")
    (pkg / "d.py").write_text("x = 1\n")
    assert code.closure("models.a", tmp_path) == ("models/a.py", "models/b.py", "models/c.py")


def test_digest_changes_when_any_module_in_the_closure_changes(tmp_path):
    import shutil

    for package in code.PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = code.digest("stages.evaluate", tmp_path)
    assert before == code.digest("stages.evaluate", REPO)
    with open(tmp_path / "models" / "edm.py", "a") as f:  # a sampler evaluate reaches only via models.family
        f.write("\n# edited\n")
    assert code.digest("stages.evaluate", tmp_path) != before
    with open(tmp_path / "flows" / "cli.py", "a") as f:  # not in the closure
        f.write("\n# edited\n")
    assert code.digest("stages.reference", tmp_path) == code.digest("stages.reference", REPO)
