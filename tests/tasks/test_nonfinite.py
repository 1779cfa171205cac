"""Non-finite guard: a NaN step is skipped and counted; a diverged run stops in one line
and leaves no non-finite tensor in any checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from polymodal.tasks.pretrain import PretrainModule
from polymodal.train import train
from tests.helpers import compose_train

BASE = [
    "logger=csv",
    "~callbacks.rich_progress_bar",
    "trainer.val_check_interval=100",
    "+trainer.limit_val_batches=1",
    "data.batch_size=16",
    "data.num_workers=0",
]


def test_one_nan_step_is_skipped_and_counted(tmp_path, shapes_dir, monkeypatch):
    step_losses, guard = PretrainModule.step_losses, PretrainModule.on_before_optimizer_step
    grads_after_guard = {}

    def nan_at_step_2(self, cache):
        loss, logs = step_losses(self, cache)
        if self.training and self.global_step == 2:
            loss = loss * float("nan")
        return loss, logs

    def recording_guard(self, optimizer):
        guard(self, optimizer)
        grads_after_guard[self.global_step] = [p.grad for p in self.parameters()]

    monkeypatch.setattr(PretrainModule, "step_losses", nan_at_step_2)
    monkeypatch.setattr(PretrainModule, "on_before_optimizer_step", recording_guard)
    metrics = train(compose_train([*BASE, "trainer.max_steps=5"], tmp_path, shapes_dir))
    assert metrics["train/global_step"] == 5 and metrics["train/nonfinite_steps"] == 1
    assert all(g is None for g in grads_after_guard[2])  # AdamW skips params without grads
    assert any(g is not None for g in grads_after_guard[3])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_diverged_run_stops_in_one_line_and_saves_no_nan(tmp_path, shapes_dir):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "polymodal.train",
        f"paths.output_dir={out}",
        f"paths.shapes_dir={shapes_dir}",
        "data.prepare=null",
        *BASE,
        "task.optimizer.lr=1e6",
        "task.scheduler.warmup_steps=0",
        "trainer.max_steps=40",
        "callbacks.last_checkpoint.every_n_train_steps=1",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0], done.stderr[-2000:]
    assert "task.optimizer.lr" in errors[0]
    saved = list((out / "checkpoints").glob("*.ckpt"))
    assert saved  # checkpoints of the steps before it diverged exist, and are finite
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), path
