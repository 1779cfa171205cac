"""Small training callbacks."""

from __future__ import annotations

import time
from collections.abc import Mapping

import lightning as L


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
        self._samples += batch["image"].shape[0]
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
