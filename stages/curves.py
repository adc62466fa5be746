"""Training curves with dvclive: loss and images/s at every progress line of `train` and `finetune`.

They land in artifacts/curves/<stage>/ (dvclive's layout: plots/metrics/*.tsv and metrics.json), which
dvc.yaml declares as outputs (pushed to the store) and plots, so `dvc plots show` and `dvc exp show` display them
next to the FID metrics. A run resumed from a snapshot (the same run key: the stage's snapshot folder,
named by everything the run depends on) keeps the curve up to the step it resumed from.
NEON_CURVES=off logs nothing (bench/gpu.sh: a bare GPU machine has no dvclive).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Callable

CURVES = Path("artifacts/curves")  # DVC outputs, cached and pushed like the artifacts
FIGURES = ("loss", "images_per_s")

Progress = Callable[[int, int, dict], None]


def folder(stage: str) -> Path:
    return CURVES / stage


def logged(stage: str, progress: Progress, run_key: str) -> Progress:
    """`progress`, also logging each line's figures to dvclive under artifacts/curves/<stage>/."""
    if os.environ.get("NEON_CURVES") == "off":
        return progress
    live = None

    def report(step: int, total: int, figures: dict | None = None) -> None:
        nonlocal live
        progress(step, total, figures)
        if live is None:
            live = _start(folder(stage), step, run_key)
        live.step = step
        for name in FIGURES:
            if figures and name in figures:
                live.log_metric(name, float(figures[name]))
        live.make_summary()

    return report


def skipped(stage: str, why: str) -> None:
    """No training ran (e.g. a user's checkpoint): an empty curve, saying why, so the DVC output exists."""
    path = folder(stage)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"run": None, "skipped": why}) + "\n")


def _start(path: Path, first_step: int, run_key: str):
    """A fresh dvclive run; resuming the same run, its curve keeps the points before `first_step`."""
    from dvclive import Live  # imports pandas: paid only by the stages that train

    key_file = path / "run.json"
    same_run = key_file.exists() and json.loads(key_file.read_text()).get("run") == run_key
    kept = {name: [row for row in read(path, name) if row[0] < first_step] if same_run else [] for name in FIGURES}
    shutil.rmtree(path, ignore_errors=True)
    live = Live(str(path), save_dvc_exp=False, dvcyaml=None, report=None)
    key_file.write_text(json.dumps({"run": run_key}) + "\n")
    for step in sorted({s for rows in kept.values() for s, _ in rows}):
        live.step = step
        for name, rows in kept.items():
            for value in (v for s, v in rows if s == step):
                live.log_metric(name, value)
    return live


def read(path: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) rows of one curve; none when it was never written."""
    tsv = path / "plots" / "metrics" / f"{name}.tsv"
    if not tsv.exists():
        return []
    with open(tsv, newline="") as f:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(f, delimiter="\t")]
