"""Benchmark rows that each run in a fresh process, so that a row's peak memory is its own."""

from __future__ import annotations

import multiprocessing as mp
import resource
from collections.abc import Callable

import torch


def in_fresh_process(target: Callable, *args):
    """`target(*args)` in a spawned process; returns what it returned."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_call, args=(target, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _call(target: Callable, args: tuple, queue) -> None:
    queue.put(target(*args))


class PeakMemory:
    """The growth of peak memory inside `with`, in MiB (`.mib`): the process's peak
    resident set on CPU (so measure in a fresh process), torch's peak allocation on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mib = (peak - self._base) / 2**20
