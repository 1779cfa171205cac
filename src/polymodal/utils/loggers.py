"""Loggers that survive a resumed run in the same output directory; wandb run ends and files."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


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


def finish_wandb() -> None:
    """End the wandb run (so the runs of a multirun never merge into one) without
    replacing the exception that may be ending this one: when SLURM requeues a job its
    SIGTERM can stop wandb's service first, and finishing then fails."""
    try:
        wandb.finish()
    except (ConnectionError, OSError) as err:
        log.warning("wandb.finish failed: %s", err)


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
