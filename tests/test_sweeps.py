"""Hydra sweeps from the command line: an Optuna search and the submitit local launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import CONF_DIR


def run_sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polymodal.train", "-m", "debug=fdr", "data.prepare=null", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, shapes_dir):
    sweep = tmp_path / "sweep"
    out = run_sweep(
        "hparams_search=clip_optuna",
        "hydra.sweeper.n_trials=3",
        f"paths.shapes_dir={shapes_dir}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    search = yaml.safe_load((Path(CONF_DIR) / "hparams_search" / "clip_optuna.yaml").read_text())
    assert results["best_params"].keys() == search["hydra"]["sweeper"]["params"].keys()
    trial_metrics = [
        yaml.safe_load((sweep / str(i) / "metrics.json").read_text())["val/zeroshot/mean_acc"]
        for i in range(3)
    ]
    assert results["best_value"] == max(trial_metrics)


def test_submitit_local_launcher_runs_each_point_as_a_job(tmp_path, shapes_dir):
    sweep = tmp_path / "sweep"
    out = run_sweep(
        "hydra/launcher=local",
        "data.batch_size=8,16",
        f"paths.shapes_dir={shapes_dir}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").exists() and (sweep / "1" / "metrics.json").exists()
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
