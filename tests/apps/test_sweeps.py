"""Hydra sweeps from the command line: an Optuna search and the submitit local launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from polymodal.utils.cli import CONFIG_DIR, swept_keys
from polymodal.utils.instantiate import wandb_spec
from polymodal.utils.resolvers import SWEPT_KEYS


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
    search = yaml.safe_load((Path(CONFIG_DIR) / "hparams_search" / "clip_optuna.yaml").read_text())
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


@pytest.fixture
def hydra_job(tmp_path, monkeypatch):
    """Compose the train config as Hydra sets up one job (of a multirun with `num`), and
    return its resolved wandb logger config; `${hydra:...}` reads the job's HydraConfig."""
    monkeypatch.setenv("POLYMODAL_ROOT", str(tmp_path))
    sweep = tmp_path / "logs" / "train" / "multiruns" / "2025-01-02_03-04-05"

    def job(*overrides: str, num: int | None = None) -> dict:
        if num is None:
            hydra = [f"hydra.runtime.output_dir={tmp_path / 'logs' / 'train' / 'runs' / 'x'}"]
        else:
            hydra = [
                "hydra.mode=MULTIRUN",
                f"hydra.sweep.dir={sweep}",
                f"hydra.job.num={num}",
                f"hydra.runtime.output_dir={sweep / str(num)}",
            ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*hydra, *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        spec = OmegaConf.to_container(wandb_spec(cfg.logger.wandb), resolve=True)
        return {k: spec[k] for k in ("project", "entity", "group", "name", "tags", "id")}

    yield job
    HydraConfig.instance().cfg = None  # later tests compose without a Hydra app


def test_wandb_runs_of_a_sweep_share_a_group_and_are_named_by_their_values(hydra_job, monkeypatch):
    """Each job resolves its own config (under SLURM in its own process): the group comes
    from the sweep dir, the same for all; the name from the experiment and the values the
    command line sweeps; the id from the output dir, so a requeued job continues its run."""
    monkeypatch.setenv(SWEPT_KEYS, ",".join(swept_keys(["-m", "task.optimizer.lr=1e-3,3e-3"])))
    common = ("experiment=siglip", "data.batch_size=8")
    first = hydra_job(*common, "task.optimizer.lr=1e-3", num=0)
    second = hydra_job(*common, "task.optimizer.lr=3e-3", num=1)
    assert first["group"] == second["group"] == "train/multiruns/2025-01-02_03-04-05"
    assert first["name"] == "siglip:task.optimizer.lr=1e-3"
    assert second["name"] == "siglip:task.optimizer.lr=3e-3"
    assert first["id"] != second["id"]
    assert hydra_job(*common, "task.optimizer.lr=1e-3", num=0)["id"] == first["id"]  # requeue
    assert first["project"] == "polymodal" and first["entity"] is None
    assert first["tags"] == ["siglip", "shapes"]
    monkeypatch.setenv(SWEPT_KEYS, "")  # an Optuna search sweeps its sweeper's params
    searched = hydra_job("hparams_search=clip_optuna", "task.optimizer.lr=1e-3", num=0)
    assert searched["name"] == "clip_shapes:task.optimizer.lr=1e-3"


def test_wandb_single_run_has_no_group_and_the_experiments_name(hydra_job):
    run = hydra_job("experiment=albef", "task.optimizer.lr=1e-3")
    assert run["group"] is None and run["name"] == "albef"
    chosen = hydra_job("logger.wandb.group=ablations", "logger.wandb.name=mine", num=0)
    assert chosen["group"] == "ablations" and chosen["name"] == "mine"
