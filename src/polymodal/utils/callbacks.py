"""Small training callbacks."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Logs `train/samples_per_sec` (all ranks) and `train/samples_per_sec_per_device`.

    Measured over the last `window` optimizer steps of wall time, so it includes data
    loading: the number a user cares about.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._start: float | None = None
        self._samples = 0
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch["image"].shape[0]
        self._steps += 1
        if self._steps < self.window:
            return
        per_device = self._samples / (time.perf_counter() - self._start)
        pl_module.log("train/samples_per_sec", per_device * trainer.world_size, prog_bar=True)
        pl_module.log("train/samples_per_sec_per_device", per_device)
        self._start, self._samples, self._steps = time.perf_counter(), 0, 0
