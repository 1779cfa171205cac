"""`benchmarks/gpu_check.sh` is ready for a lent GPU: without CUDA it says so and exits 0,
and the step benchmark it ends with prints its table (samples/s, TFLOP/s, MFU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs the real check")
def test_gpu_check_without_cuda_says_so():
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu_check: no CUDA device here; nothing to check"


def test_step_benchmark_reports_flops_and_mfu():
    out = subprocess.run(
        [sys.executable, "benchmarks/clip_step.py", "--batch-sizes", "4", "--precisions", "32"]
        + ["--steps", "1", "--peak-tflops", "0.001"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = re.search(r"^\| 4 \| 32 \| (\d+) \| ([\d.e-]+) \| ([\d.]+)% \| - \|$", out.stdout, re.M)
    assert row, out.stdout
    rate, tflops, mfu = float(row[1]), float(row[2]), float(row[3])
    assert rate > 0 and mfu == pytest.approx(100 * tflops / 0.001, rel=0.05, abs=0.1)
