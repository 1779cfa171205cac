"""A training callback for fault tests, loaded by `polymodal-train` subprocesses through
`+callbacks.recorder._target_=faults.StepRecorder` (tests/ on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal

import lightning as L


class StepRecorder(L.Callback):
    """Appends `{"step", "keys"}` of every trained batch to `path` (one JSON line, flushed
    and fsynced before the next step), and kills its own process with SIGKILL right after
    training step `kill_at` (before that step's checkpoint could be written)."""

    def __init__(self, path: str, kill_at: int | None = None) -> None:
        self.path = path
        self.kill_at = kill_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer step this batch was part of
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "keys": list(batch["key"])}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
