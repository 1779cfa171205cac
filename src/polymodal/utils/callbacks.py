"""Small training callbacks."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
import wandb
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

log = logging.getLogger(__name__)


class Throughput(L.Callback):
    """Logs `train/samples_per_sec` (all ranks), `train/samples_per_sec_per_device` and,
    when the module can count its FLOPs, `train/mfu` (model FLOPs utilisation).

    Throughput is measured over the last `window` optimizer steps of wall time, so it
    includes data loading: the number a user cares about. MFU = achieved training FLOPs
    per second per device / the device's peak. The FLOPs of a training sample are counted
    once, on the first batch (`pl_module.flops_per_sample`); the peak is configuration
    (`peak_flops`: device type -> FLOP/s, e.g. a GPU's dense bf16 peak), because no
    program can ask the hardware for it.
    """

    def __init__(self, window: int = 20, peak_flops: Mapping[str, float] | None = None) -> None:
        self.window = window
        self.peak_flops = dict(peak_flops or {})
        self.flops_per_sample: float | None = None
        self._start: float | None = None
        self._samples = 0
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_sample is None and hasattr(pl_module, "flops_per_sample"):
            self.flops_per_sample = pl_module.flops_per_sample(batch)
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += len(batch["key"])
        self._steps += 1
        if self._steps < self.window:
            return
        per_device = self._samples / (time.perf_counter() - self._start)
        pl_module.log("train/samples_per_sec", per_device * trainer.world_size, prog_bar=True)
        pl_module.log("train/samples_per_sec_per_device", per_device)
        peak = self.peak_flops.get(trainer.strategy.root_device.type)
        if self.flops_per_sample and peak:
            pl_module.log("train/mfu", per_device * self.flops_per_sample / peak)
        self._start, self._samples, self._steps = time.perf_counter(), 0, 0


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps towards `trainer.max_steps`
    (`Epoch 3 · step  120/1500`): training runs max_steps over streams with
    max_epochs=-1, where Lightning's bar reads `Epoch 0/-2` and counts batches per epoch.
    With max_steps unset (-1) it is Lightning's bar."""

    def _by_step(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_step() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_step():
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch} · step"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the bar shows batch_idx + 1: make that the global step (resumed runs start there)
        step_index = trainer.global_step - 1 if self._by_step() else batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, step_index)


class LastCheckpoint(ModelCheckpoint):
    """The checkpoint at `path` (`paths.last_checkpoint`, the file auto_resume looks for)
    every `every_n_train_steps` and when training ends, so the file always holds the final
    weights: `polymodal.load` gets the trained model, and rerunning a finished run
    (auto_resume) resumes at its end instead of redoing the steps after the last periodic
    save."""

    def __init__(self, path: str | Path, **kwargs) -> None:
        path = Path(path)
        super().__init__(dirpath=str(path.parent), filename=path.stem, **kwargs)
        self.FILE_EXTENSION = path.suffix  # the name exactly as given

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.global_step != self._last_global_step_saved:
            trainer.save_checkpoint(self.format_checkpoint_name({}))
            self._last_global_step_saved = trainer.global_step


class Preemption(L.Callback):
    """Saves `path` (`paths.last_checkpoint`) when SLURM warns that the job will be
    stopped (SIGUSR2: submitit's `--signal=USR2@<delay>` before the time limit, or a
    preemption), then hands over to the handler that was there before (submitit's: rank 0
    requeues the job and exits). Without one, fit just ends early and a rerun resumes
    (`auto_resume`).

    The signal only sets a flag: at the end of each training batch the ranks agree on it
    (a max all-reduce, so every rank stops after the same step) and fit stops there; the
    checkpoint is written when training ends, after that step's metrics were logged, and
    the loggers are closed before the requeue. Active only inside a SLURM job.
    """

    def __init__(self, path: str | Path, signal_name: str = "SIGUSR2"):
        self.path = Path(path)
        self.signum = signal.Signals[signal_name]
        self.requested = False
        self.stopped = False
        self._installed = False
        self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and "SLURM_JOB_ID" in os.environ:
            self._previous = signal.signal(self.signum, self._on_signal)
            self._installed = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: stopping after this step", self.signum.name)
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._installed or self.stopped:
            return
        requested = self.requested
        if trainer.world_size > 1:  # one scalar all-reduce per step, only in SLURM jobs
            flag = torch.tensor(float(requested), device=pl_module.device)
            requested = trainer.strategy.reduce(flag, reduce_op="max").item() > 0
        # stop only where an optimizer step just happened: a checkpoint inside a gradient
        # accumulation window would not hold the window's gradients
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if requested and (stepped or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            self.stopped = trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.stopped:
            return
        trainer.save_checkpoint(self.path)
        log.warning("saved %s at step %d", self.path, trainer.global_step)
        for callback in trainer.checkpoint_callbacks:  # don't save that step twice: the
            if isinstance(callback, LastCheckpoint):  # second would become last-previous
                callback._last_global_step_saved = trainer.global_step
        # close the loggers while their helper processes still run: the requeue that
        # follows sends SIGTERM to every process of the job (wandb's service included)
        for logger in trainer.loggers:
            logger.finalize("preempted")
        wandb.finish()
        if callable(self._previous):
            self._previous(self.signum, None)  # submitit: requeue (rank 0) and exit


class EMAWeightAveraging(LightningEMA):
    """Lightning's EMA of the weights, whose checkpoints keep the training weights.

    Lightning copies the average into the model when training ends, so a checkpoint saved
    after that (last.ckpt at the end of fit: checkpoint callbacks run last) would record the
    average as the training weights, and a run resumed from it (auto_resume with a larger
    trainer.max_steps) would go on from the average with the optimizer state of the other.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._trained: dict[str, torch.Tensor] | None = None  # set when fit ends

    def on_train_start(self, trainer, pl_module) -> None:
        self._trained = None  # a new fit trains again
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._trained = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._trained is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._trained
