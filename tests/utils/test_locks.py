"""Processes sharing a directory: datasets generated on first use by several processes at
once, and a second training run into a live run's output directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from polymodal.data.digits import write_digits
from polymodal.data.shapes import write_shapes
from polymodal.train import LOCK_FILE, output_dir_lock, train
from polymodal.utils.errors import ConfigError
from tests.helpers import compose_train

SHAPES = {"num_train": 64, "num_val": 16, "num_test": 16, "shard_size": 16, "vocab_size": 300}
DIGITS = {"num_val": 100, "num_test": 100, "image_size": 8, "shard_size": 200, "vocab_size": 300}
# Each process reports when it generates, signals that it is ready, and starts
# ensure_shapes then ensure_digits when the test says go (all four at the same moment).
PREPARE = f"""
import functools, logging, sys, time
from pathlib import Path
import polymodal.data.digits as digits, polymodal.data.shapes as shapes
logging.basicConfig(level=logging.INFO)
out, ready, go = (Path(a) for a in sys.argv[1:])
for module, name in ((shapes, "write_shapes"), (digits, "write_digits")):
    write = getattr(module, name)
    def report(*args, write=write, name=name, **kwargs):
        print("generating", name, flush=True)
        return write(*args, **kwargs)
    setattr(module, name, functools.wraps(write)(report))
ready.touch()
while not go.exists():
    time.sleep(0.005)
shapes.ensure_shapes(out / "shapes", workers=1, **{SHAPES!r})
digits.ensure_digits(out / "digits", **{DIGITS!r})
"""
# holds a run's output-directory lock until killed, with a forked child (as a DataLoader
# worker would be) that outlives it
HOLD = """
import multiprocessing, sys, time
from polymodal.utils.files import try_lock
with try_lock(sys.argv[1]):
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(600)
"""


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_processes_preparing_the_same_datasets_at_once_all_succeed(tmp_path):
    """4 processes on a fresh directory: one generates each dataset, the others wait for
    it and find it complete; the files equal a single process's."""
    out = tmp_path / "data"
    procs = []
    for i in range(4):
        command = [sys.executable, "-c", PREPARE, str(out), str(tmp_path / f"ready{i}")]
        procs.append(
            subprocess.Popen(
                [*command, str(tmp_path / "go")],
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    stdout = "".join(out for out, _ in results)
    assert stdout.count("generating write_shapes") == stdout.count("generating write_digits") == 1
    assert any("waiting for" in err for _, err in results)

    write_shapes(tmp_path / "ref" / "shapes", workers=1, **SHAPES)
    write_digits(tmp_path / "ref" / "digits", **DIGITS)
    for name in ("shapes", "digits"):
        assert files(out / name) == files(tmp_path / "ref" / name)


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of output dir `tmp_path / "run"`."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run" / LOCK_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    process.worker = int(process.stdout.readline())
    yield process
    process.kill()
    process.wait()
    os.kill(process.worker, signal.SIGKILL)


def lock_config(output_dir: Path):
    return OmegaConf.create(
        {
            "paths": {
                "output_dir": str(output_dir),
                "checkpoint_dir": str(output_dir / "checkpoints"),
                "last_checkpoint": str(output_dir / "checkpoints" / "last.ckpt"),
            }
        }
    )


def test_second_run_into_a_live_runs_output_dir_is_refused(tmp_path, holder):
    run = tmp_path / "run"
    owner = f"pid {holder.pid} on {socket.gethostname()}"
    expected = f"{run}: another run is using this output directory ({owner}); "
    with pytest.raises(ConfigError) as refused:
        train(compose_train([], run, tmp_path / "no_data"))
    assert str(refused.value) == expected + "wait for it to end or choose another hydra.run.dir"

    cli = subprocess.run(
        [sys.executable, "-m", "polymodal.train", f"hydra.run.dir={run}", "data.prepare=null"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
    assert "Traceback" not in cli.stderr


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"])
def test_only_global_rank_zero_takes_the_lock(tmp_path, holder, monkeypatch, variable):
    """Lightning's ddp launcher re-runs the script for ranks > 0 (LOCAL_RANK), srun starts
    every rank (SLURM_PROCID): those share rank 0's run, never refused."""
    monkeypatch.setenv(variable, "0")
    with pytest.raises(ConfigError), output_dir_lock(lock_config(tmp_path / "run")):
        pass
    monkeypatch.setenv(variable, "1")
    with output_dir_lock(lock_config(tmp_path / "run")):
        pass


def test_lock_left_by_a_killed_run_does_not_block_the_requeued_one(tmp_path, holder):
    """kill -9 leaves the lock file (with the dead pid) but the kernel dropped the lock,
    though a worker the run forked still lives; the checkpoint temp files the killed run
    was writing are removed."""
    run = tmp_path / "run"
    stale_temp = run / "checkpoints" / "last.ckpt.12345.0badcafe.tmp"
    stale_temp.parent.mkdir()
    stale_temp.write_bytes(b"half a checkpoint")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (run / LOCK_FILE).read_text()
    os.kill(holder.worker, 0)  # still alive
    with output_dir_lock(lock_config(run)):
        assert not stale_temp.exists()
        with (
            pytest.raises(ConfigError, match=f"pid {os.getpid()} on"),
            output_dir_lock(lock_config(run)),
        ):
            pass
