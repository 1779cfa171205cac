"""`polymodal-train`: the Hydra training app (`python -m polymodal.train` is the same)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from polymodal.tasks.pretrain import build_module
from polymodal.utils.checkpoint import init_weights, read_checkpoint
from polymodal.utils.checkpoint_io import previous_path
from polymodal.utils.cli import hydra_app
from polymodal.utils.errors import ConfigError
from polymodal.utils.files import LockHeld, remove_stale_temps, try_lock
from polymodal.utils.instantiate import instantiate_group
from polymodal.utils.loggers import finish_wandb
from polymodal.utils.monitor import optimized_metric
from polymodal.utils.overrides import replaces_specs
from polymodal.utils.report import print_metrics, write_metrics
from polymodal.utils.validate import check_types

log = logging.getLogger(__name__)
# what fit leaves on trainer.callback_metrics (PretrainModule.on_train_end) for the report,
# by key prefix (data/skipped/<reason> counts skipped samples by reason)
RUN_FACTS = (
    "train/global_step",
    "train/nonfinite_steps",
    "data/skipped",
    "dist/ranks_same_step",
    "dist/ranks_in_sync",
)
# held by a live run in its output directory (see output_dir_lock)
LOCK_FILE = ".polymodal.lock"
# environment variables that give a process's rank before any process group exists
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def launched_as_global_rank_zero() -> bool:
    """Whether this process is (or will become) global rank 0, from the variables that
    launchers set before any process group exists: Lightning's ddp launcher re-runs the
    script with LOCAL_RANK/NODE_RANK, torchrun sets RANK, srun SLURM_PROCID."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


@contextlib.contextmanager
def output_dir_lock(cfg: DictConfig) -> Iterator[None]:
    """Refuse (ConfigError) to train into an output directory that a live run is using:
    two runs would mix their checkpoints and metrics. Held by global rank 0 only; the
    kernel drops it when that process dies, so a requeued or rerun job is not refused.
    Temp files of checkpoint saves that a kill interrupted are removed under it."""
    if not launched_as_global_rank_zero():
        yield
        return
    output_dir = Path(cfg.paths.output_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(try_lock(output_dir / LOCK_FILE))
        except LockHeld as held:
            raise ConfigError(
                f"{output_dir}: another run is using this output directory ({held.owner}); "
                "wait for it to end or choose another hydra.run.dir"
            ) from None
        for directory in {Path(cfg.paths.checkpoint_dir), Path(cfg.paths.last_checkpoint).parent}:
            if directory.is_dir():
                remove_stale_temps(directory)
        yield


def ddp_for_unused_parameters(cfg: DictConfig) -> None:
    """With `data.sources`, a step trains only its batch's modalities (an image-text step
    leaves the audio stem unused), and a language model of text alone (`model.modalities=
    [text]`) trains its decoder, not its text encoder: DDP must then look for unused
    parameters, and cannot assume one graph for every step (static_graph). Covers our
    DDPStrategy presets and Lightning's strategy names ("ddp", "ddp_spawn", and "auto" on
    several devices)."""
    text_alone = list(cfg.model.get("modalities") or []) == ["text"]
    if not (cfg.data.get("sources") or text_alone):
        return
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        if str(strategy.get("_target_", "")).endswith("DDPStrategy"):
            with open_dict(strategy):
                strategy.static_graph = False
                strategy.find_unused_parameters = True
        return
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1) or 1
    several = nodes > 1 or devices == -1 or (isinstance(devices, int) and devices > 1)
    names = {n: n for n in ("ddp", "ddp_spawn", "ddp_fork")} | {"auto": "ddp" if several else None}
    name = names.get(strategy or "auto")
    if name is not None:
        with open_dict(cfg.trainer):
            cfg.trainer.strategy = f"{name}_find_unused_parameters_true"


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured task, validate the final weights, write metrics.json, holding
    the output directory's lock (a second run there is refused).

    Returns the final metrics (the app prints them as a table)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # `???` in a preset (data=webdataset): the user must give these
        raise ConfigError(f"{', '.join(missing)}: required, not set (e.g. {missing[0]}=...)")
    check_types(cfg)
    with output_dir_lock(cfg):
        ckpt_path = resume_from(cfg)  # before building anything: a bad file fails at once
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        ddp_for_unused_parameters(cfg)
        module = build_module(cfg)
        if cfg.get("init_from") and ckpt_path is None:
            start_from(module, cfg.init_from, cfg.init_keys)
        module.run_config = OmegaConf.to_container(cfg, resolve=True)
        callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
        loggers = instantiate_group(cfg.get("logger"), "logger")
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

        if cfg.get("validate_before_training"):
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        fit_metrics = trainer.callback_metrics
        facts = {k: float(v) for k, v in fit_metrics.items() if k.startswith(RUN_FACTS)}
        # a finished run resumed again trains nothing, and Lightning then skips on_train_end
        facts.setdefault("train/global_step", float(trainer.global_step))
        if facts.get("dist/ranks_in_sync") == 0.0:
            log.error("ranks ended fit with different weights: distributed training is broken")
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        # one dict per val set (data.val_sets); their names never collide
        metrics = {k: float(v) for result in results for k, v in result.items()}
        metrics.update(facts)
        if rank_zero_only.rank == 0:
            write_metrics(metrics, cfg.paths.output_dir)
        return metrics


def resume_from(cfg: DictConfig) -> str | None:
    """`ckpt_path` (a file that does not load is a ConfigError), else with `auto_resume`
    the newest of the run's own checkpoints that loads: a requeued job, or a rerun of the
    same command into the same output directory. A checkpoint a kill left unreadable is
    reported in one warning and the next older one is used; when none loads, the run
    stops (ConfigError) rather than train from scratch over them."""
    if cfg.get("ckpt_path"):
        if is_local_file(cfg.ckpt_path):
            try:
                check_resumable(cfg.ckpt_path)
            except ConfigError as err:
                raise ConfigError(f"ckpt_path={err}") from None
        return cfg.ckpt_path
    if not cfg.get("auto_resume"):
        return None
    candidates = resume_candidates(Path(cfg.paths.last_checkpoint), Path(cfg.paths.checkpoint_dir))
    for path in candidates:
        try:
            check_resumable(path)
        except ConfigError as err:
            log.warning("cannot resume from %s; trying the next older checkpoint", err)
            continue
        log.info("resuming from %s", path)
        return str(path)
    if candidates:
        raise ConfigError(
            f"{cfg.paths.checkpoint_dir}: no checkpoint there loads (warnings above); move "
            "them away, or set auto_resume=false to train from scratch"
        )
    return None


def start_from(module: L.LightningModule, path: str, keys: DictConfig) -> None:
    """Load `init_from` weights into the new module and log what was and was not."""
    found = init_weights(module, path, keys.prefix, list(keys.include), list(keys.exclude))
    log.info("init_from=%s: loaded %d tensors", path, len(found["loaded"]))
    for what, names in (
        ("not in the model", found["unused"]),
        ("not in the file", found["not_in_file"]),
    ):
        if names:
            log.warning("init_from=%s: %d tensors %s, e.g. %s", path, len(names), what, names[:3])


def resume_candidates(last: Path, checkpoint_dir: Path) -> list[Path]:
    """`last` (paths.last_checkpoint), the one it replaced (last-previous.ckpt), then every
    other checkpoint file in `checkpoint_dir` and beside `last`, newest first."""
    first = [last, previous_path(last)]
    found = {*checkpoint_dir.glob("*.ckpt"), *last.parent.glob("*.ckpt")}
    others = [p for p in found if p not in first and p.is_file()]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in first if p.is_file()] + others


def is_local_file(ckpt_path: str) -> bool:
    """False for what Lightning resolves itself: a remote URL, "last", "best", "hpc",
    "registry:..."."""
    keyword = ckpt_path in ("last", "best", "hpc") or ckpt_path.startswith("registry")
    return not keyword and _is_local_file_protocol(ckpt_path)


def check_resumable(path: str | Path) -> None:
    """Raise a one-line ConfigError naming `path` unless fit can resume from it: it loads
    without unpickling code (a kill may have cut it short) and is a Lightning checkpoint."""
    if "state_dict" not in read_checkpoint(path):
        raise ConfigError(f"{path}: not a Lightning checkpoint (no state_dict)")


@replaces_specs
@hydra_app("train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    finally:
        finish_wandb()
    if rank_zero_only.rank == 0:
        print_metrics(metrics, cfg.paths.output_dir)  # last, after wandb's own summary
    return metrics.get(optimized_metric(cfg))


if __name__ == "__main__":
    main()
