"""`polymodal-train`: the Hydra training app (`python -m polymodal.train` is the same)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import wandb
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from polymodal.utils.errors import ConfigError
from polymodal.utils.instantiate import instantiate_group
from polymodal.utils.report import print_metrics, write_metrics
from polymodal.utils.validate import check_types

log = logging.getLogger(__name__)
# what fit leaves on trainer.callback_metrics (PretrainModule.on_train_end) for the report
RUN_FACTS = (
    "train/global_step",
    "data/skipped_samples",
    "dist/ranks_same_step",
    "dist/ranks_in_sync",
)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured task, validate the final weights, write metrics.json.

    Returns the final metrics (the app prints them as a table)."""
    check_types(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    backbone = instantiate(cfg.model)
    module = instantiate(cfg.task, backbone=backbone)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.get("validate_before_training"):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from(cfg))
    fit_metrics = trainer.callback_metrics
    facts = {k: float(fit_metrics[k]) for k in RUN_FACTS if k in fit_metrics}
    # a finished run resumed again trains nothing, and Lightning then skips on_train_end
    facts.setdefault("train/global_step", float(trainer.global_step))
    if facts.get("dist/ranks_in_sync") == 0.0:
        log.error("ranks ended fit with different weights: distributed training is broken")
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    metrics.update(facts)
    if rank_zero_only.rank == 0:
        write_metrics(metrics, cfg.paths.output_dir)
    return metrics


def finish_wandb() -> None:
    """End the wandb run (so the runs of a multirun never merge into one) without
    replacing the exception that may be ending this one: when SLURM requeues a job its
    SIGTERM can stop wandb's service first, and finishing then fails."""
    try:
        wandb.finish()
    except (ConnectionError, OSError) as err:
        log.warning("wandb.finish failed: %s", err)


def resume_from(cfg: DictConfig) -> str | None:
    """`ckpt_path`, else (with `auto_resume`) the run's own last.ckpt if it exists: a
    requeued job, or a rerun of the same command into the same output directory."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    last = Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    if cfg.get("auto_resume") and last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        finish_wandb()
    if rank_zero_only.rank == 0:
        print_metrics(metrics, cfg.paths.output_dir)  # last, after wandb's own summary
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
