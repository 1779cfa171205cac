"""Submission to a real SLURM controller (a one-node cluster started for these tests):
a DDP sweep through hydra/launcher=slurm, and a preempted job that requeues and resumes.

Skipped when slurm-wlm/munge are not installed, unless POLYMODAL_REQUIRE_SLURM=1 (set by
`.ci/run`, which installs them), where that is a failure instead.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, missing_binaries

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm():
    missing = missing_binaries()
    if missing:
        message = f"SLURM not installed (missing {missing}); .ci/run installs it"
        if os.environ.get("POLYMODAL_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="polymodal-slurm-"))  # pytest's tmp dirs are 0700
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def submit(slurm: SlurmCluster, *overrides: str, cwd: Path, env: dict | None = None):
    """`polymodal-train -m hydra/launcher=slurm ...` on CPU; blocks until the jobs end."""
    command = [
        sys.executable,
        "-m",
        "polymodal.train",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "data.prepare=null",
        "data.batch_size=16",
        "data.val_batch_size=64",
        *overrides,
    ]
    environment = {**slurm.env, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, slurm: SlurmCluster, timeout: float = 600) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        process.kill()
        raise AssertionError(f"submission still running after {timeout} s\n{slurm.logs()}") from err
    assert process.returncode == 0, output[-4000:] + slurm.logs()
    return output


def test_sweep_submits_one_ddp_job_per_point(slurm, tmp_path, shapes_dir):
    """Two sweep points, each a job whose 2 srun tasks are the 2 DDP ranks."""
    sweep = tmp_path / "sweep"
    process = submit(
        slurm,
        "trainer=ddp",
        "trainer.devices=2",
        "data.num_workers=0",
        "trainer.num_nodes=1",
        "+trainer.strategy.process_group_backend=gloo",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "logger=csv",
        "~callbacks",
        "task.optimizer.lr=1e-3,2e-3",
        f"paths.shapes_dir={shapes_dir}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    finish(process, slurm)
    for point in ("0", "1"):
        metrics = json.loads((sweep / point / "metrics.json").read_text())
        assert metrics["train/global_step"] == 6
        assert metrics["dist/ranks_same_step"] == 1.0
        assert metrics["dist/ranks_in_sync"] == 1.0
    # the two points really were separate SLURM jobs with two tasks each
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2


def logged_steps(csv_path: Path) -> list[int]:
    with open(csv_path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_preempted_job_requeues_and_resumes_where_it_stopped(slurm, tmp_path, shapes_dir):
    """SIGUSR2 mid-run: last.ckpt at that step, submitit requeues, the job comes back in
    the same output dir and wandb run, resumes from the checkpoint and finishes, and its
    data stream continues: every step's batch recorded once, each epoch's keys once."""
    sweep = tmp_path / "sweep"
    record = tmp_path / "keys.jsonl"
    process = submit(
        slurm,
        "trainer.max_steps=150",
        "trainer.val_check_interval=1000",
        "+trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "logger=many",
        "callbacks.last_checkpoint.every_n_train_steps=1000",
        "~callbacks.rich_progress_bar",
        "data.num_workers=1",  # the signal reaches the loader worker too: it must survive
        f"paths.shapes_dir={shapes_dir}",
        f"hydra.sweep.dir={sweep}",
        "+callbacks.recorder._target_=faults.StepRecorder",
        f"+callbacks.recorder.path={record}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    run_dir = sweep / "0"

    def alive() -> None:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read()[-4000:] + slurm.logs())

    job_id = wait_for_job(slurm, sweep, alive)
    wait_until(lambda: alive() or any((run_dir / "csv").glob("*")), "training to start")
    time.sleep(3)  # some steps in
    slurm.run("scancel", "--signal=USR2", job_id)
    wait_until(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), "the preemption save")
    # a requeued job waits ~2 minutes before it is eligible again: start it now
    wait_until(lambda: slurm.job_state(job_id) in ("PENDING", "REQUEUED"), "the requeue")

    def started_now() -> bool:
        slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        return slurm.job_state(job_id) not in ("PENDING", "REQUEUED")

    wait_until(started_now, "the requeued job to start")
    finish(process, slurm)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/global_step"] == 150
    steps = logged_steps(run_dir / "csv" / "metrics.csv")
    assert steps == list(range(150))  # every step once: no gap, no restart from 0
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(150))  # no batch trained twice
    for epoch in range(150 // 32 + 1):  # 512 samples, 32 batches of 16 an epoch
        keys = [k for r in rows[epoch * 32 : (epoch + 1) * 32] for k in r["keys"]]
        assert len(keys) == len(set(keys)), f"epoch {epoch} repeats a sample"
    log = (run_dir / "train.log").read_text()
    assert "resuming from" in log and "saved" in log
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def wait_for_job(slurm: SlurmCluster, sweep: Path, alive) -> str:
    """The id of the single job submitted into `sweep` (`alive()` raises if the
    submitting process died)."""
    found: list[str] = []

    def submitted() -> bool:
        alive()
        # job dirs are named by the numeric job id; submitit's pickles (hex names that
        # may start with a digit) come and go beside them
        found[:] = [p.name for p in (sweep / ".submitit").glob("*") if p.name.isdigit()]
        return bool(found)

    wait_until(submitted, "the job to be submitted")
    return found[0]
