"""Loggers that survive a resumed run in the same output directory, and media for wandb."""

from __future__ import annotations

import csv
from collections.abc import Mapping

import numpy as np
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from polymodal.evaluation.media import RetrievalExamples


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
