"""Loggers that survive a resumed run in the same output directory, and media for wandb."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from polymodal.evaluation.media import RetrievalExamples
from polymodal.utils.cli import SWEPT_KEYS


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps its rows and
    header and appends, so a requeued or resumed run continues the same history."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv grows across resumed runs instead of starting over."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def log_media_to_wandb(
    logger: WandbLogger,
    pictures: Mapping[str, np.ndarray],
    examples: RetrievalExamples | None,
    step: int,
) -> None:
    """Confusion matrices as `val/confusion_<attr>` images and the retrieval examples as a
    `val/retrieval` table (the image, its caption, the top-k retrieved captions)."""
    for name, pixels in pictures.items():
        if name.startswith("confusion_"):
            logger.log_image(key=f"val/{name}", images=[pixels], step=step)
    if examples is not None:
        data = [
            [wandb.Image(image), *row]
            for image, row in zip(examples.images, examples.rows(), strict=True)
        ]
        columns = ["image", *examples.columns()]
        logger.log_table(key="val/retrieval", columns=columns, data=data, step=step)


def _multirun_job() -> DictConfig | None:
    """The Hydra config of this job when it is one point of a multirun (-m), else None
    (a single run, or a config composed without a Hydra app, as tests and notebooks do)."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return hydra if hydra.mode == RunMode.MULTIRUN else None


def sweep_group(output_dir: str, log_dir: str) -> str | None:
    """`${polymodal.sweep_group:...}`, the wandb group: in a multirun, the sweep dir (the
    parent of each job's output dir; relative to `log_dir` when under it, e.g.
    `train/multiruns/<time>`). Every job of one sweep resolves the same, also as separate
    SLURM jobs and after a requeue. A single run has no group (None)."""
    if _multirun_job() is None:
        return None
    sweep_dir, log_dir_path = Path(output_dir).parent, Path(log_dir)
    if sweep_dir.is_relative_to(log_dir_path):
        return str(sweep_dir.relative_to(log_dir_path))
    return sweep_dir.name


def run_name(default: str) -> str:
    """`${polymodal.run_name:${task_name}}`, the wandb run name: the experiment, and in a
    multirun the values its job sweeps (e.g. `clip_shapes:task.optimizer.lr=0.001`; the
    fixed overrides every job shares are left out). `default` without an experiment or a
    Hydra app."""
    if not HydraConfig.initialized():
        return default
    hydra = HydraConfig.get()
    name = hydra.runtime.choices.get("experiment") or default
    if _multirun_job() is None:
        return name
    swept = swept_keys(hydra)
    overrides = ",".join(o for o in hydra.overrides.task if override_key(o) in swept)
    return f"{name}:{overrides}" if overrides else name


def swept_keys(hydra: DictConfig) -> set[str]:
    """The keys a multirun sweeps: those of the command line (`SWEPT_KEYS`, set by the app
    that launched the sweep and inherited by its jobs, also SLURM's) and an Optuna-style
    sweeper's `params`."""
    keys = {key for key in os.environ.get(SWEPT_KEYS, "").split(",") if key}
    return keys | set(OmegaConf.select(hydra, "sweeper.params") or {})


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`."""
    return override.partition("=")[0].lstrip("+~")


def log_eval_files(logger: WandbLogger, out_dir: Path) -> None:
    """What `polymodal-eval` wrote, into its wandb run: each `media/*.png` as an image,
    each `media/*.csv` and `captions/*.jsonl` as a table, keyed by the file's stem."""
    for path in sorted(out_dir.glob("media/*.png")):
        logger.log_image(key=f"media/{path.stem}", images=[str(path)])
    for path in sorted(out_dir.glob("media/*.csv")):
        with open(path, newline="") as file:
            rows = list(csv.reader(file))
        if rows:
            logger.log_table(key=f"media/{path.stem}", columns=rows[0], data=rows[1:])
    for path in sorted(out_dir.glob("captions/*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        if records:
            columns = list(records[0])
            data = [
                [" | ".join(v) if isinstance(v, list) else v for v in map(r.get, columns)]
                for r in records
            ]
            logger.log_table(key=f"captions/{path.stem}", columns=columns, data=data)
