"""Files that survive kill -9: checkpoints (AtomicCheckpointIO), the resume fallback when
last.ckpt is damaged anyway, and metrics.json."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from polymodal.train import resume_from
from polymodal.utils.checkpoint_io import AtomicCheckpointIO, previous_path
from polymodal.utils.errors import ConfigError
from polymodal.utils.files import atomic_file, remove_stale_temps
from polymodal.utils.report import write_metrics
from tests.helpers import logged_steps, train_tiny

KILL_TRIALS = 24


def checkpoint(step: int) -> dict:
    """A Lightning-shaped checkpoint of ~8 MB: weights, Adam moments, counters."""
    generator = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.randn(256, 256, generator=generator) for i in range(8)}
    moments = {
        i: {"exp_avg": w.clone(), "exp_avg_sq": w.square()} for i, w in enumerate(weights.values())
    }
    return {
        "state_dict": weights,
        "optimizer_states": [{"state": moments, "param_groups": [{"lr": 1e-3}]}],
        "global_step": step,
        "epoch": 0,
        "pytorch-lightning_version": "2.6.0",
    }


def save_forever(io_class: type, path: Path, state: dict) -> None:
    """Child process: save `state` as steps 1, 2, ... to `path` until killed, with $TMPDIR
    on another filesystem than `path` (tmpfs). (No tensor maths here: a forked child can
    hang in the thread pool its parent used.)"""
    os.environ["TMPDIR"] = "/dev/shm"
    tempfile.tempdir = None  # re-read $TMPDIR
    io = io_class()
    for step in range(1, 1_000_000):
        state["global_step"] = step
        io.save_checkpoint(state, path)


def outcome(path: Path, saved: dict) -> str:
    """What a kill left at `path`: absent, complete (loads with weights_only and holds the
    saved weights) or truncated."""
    if not path.exists():
        return "absent"
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError):
        return "truncated"
    weights = saved["state_dict"].items()
    same = all(torch.equal(loaded["state_dict"][k], v) for k, v in weights)
    return "complete" if same and loaded["global_step"] >= 1 else "truncated"


def kill_during_saves(io_class: type, directory: Path, trials: int) -> dict[str, int]:
    """SIGKILL a saving child at a random (seeded) moment, `trials` times; counts of what
    the kill left at the checkpoint path and at its previous_path."""
    context = multiprocessing.get_context("fork")  # the parent's torch import is reused
    rng = random.Random(0)
    state = checkpoint(0)
    counts = {"absent": 0, "complete": 0, "truncated": 0, "previous_truncated": 0, "temps": 0}
    for trial in range(trials):
        path = directory / f"trial{trial}" / "last.ckpt"
        path.parent.mkdir()
        child = context.Process(target=save_forever, args=(io_class, path, state))
        child.start()
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        counts[outcome(path, state)] += 1
        counts["previous_truncated"] += outcome(previous_path(path), state) == "truncated"
        counts["temps"] += len(remove_stale_temps(path.parent))
        assert {p.name for p in path.parent.iterdir()} <= {"last-previous.ckpt", "last.ckpt"}
    return counts


def test_kill_9_during_checkpoint_saves_never_leaves_a_truncated_file(tmp_path):
    """$TMPDIR on tmpfs, checkpoints on disk: Lightning's save would copy across
    filesystems into the final path; AtomicCheckpointIO's rename cannot be half done."""
    assert os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
    start = time.monotonic()
    counts = kill_during_saves(AtomicCheckpointIO, tmp_path, KILL_TRIALS)
    print(f"AtomicCheckpointIO, {KILL_TRIALS} kills: {counts}, {time.monotonic() - start:.1f} s")
    assert counts["truncated"] == counts["previous_truncated"] == 0
    assert counts["complete"] >= KILL_TRIALS // 2  # most kills came after a first save
    assert counts["temps"] > 0  # and some came mid-write: the test hits the window


def test_overwritten_checkpoint_is_kept_as_previous(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1), path)
    assert not previous_path(path).exists()
    io.save_checkpoint(checkpoint(2), path)
    io.save_checkpoint(checkpoint(3), path)
    steps = [torch.load(p, weights_only=True)["global_step"] for p in (path, previous_path(path))]
    assert steps == [3, 2]
    path.write_bytes(path.read_bytes()[:1000])  # damaged: not kept over the good previous one
    io.save_checkpoint(checkpoint(4), path)
    steps = [torch.load(p, weights_only=True)["global_step"] for p in (path, previous_path(path))]
    assert steps == [4, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-previous.ckpt", "last.ckpt"]


def resume_config(checkpoint_dir: Path, **keys) -> OmegaConf:
    return OmegaConf.create(
        {
            "auto_resume": True,
            "paths": {
                "checkpoint_dir": str(checkpoint_dir),
                "last_checkpoint": str(checkpoint_dir / "last.ckpt"),
            },
            **keys,
        }
    )


def test_resume_falls_back_newest_first_and_names_each_bad_file(tmp_path, caplog):
    io = AtomicCheckpointIO()
    for step, name in [(3, "best-step3.ckpt"), (2, "best-step2.ckpt")]:
        io.save_checkpoint(checkpoint(step), tmp_path / name)
    os.utime(tmp_path / "best-step2.ckpt", (0, 0))  # older
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "last-previous.ckpt").write_text("not a checkpoint\n")
    with caplog.at_level(logging.WARNING, "polymodal.train"):
        assert resume_from(resume_config(tmp_path)) == str(tmp_path / "best-step3.ckpt")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    for warning, name in zip(warnings, ("last.ckpt", "last-previous.ckpt"), strict=True):
        assert warning.startswith(f"cannot resume from {tmp_path / name}: truncated or not a")
    assert all("\n" not in w for w in warnings)


def test_resume_with_nothing_loadable_is_refused_in_one_line(tmp_path):
    """Not training from scratch over the run's checkpoints unless the user says so."""
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError) as refused:
        resume_from(resume_config(tmp_path))
    assert str(refused.value) == (
        f"{tmp_path}: no checkpoint there loads (warnings above); move them away, or set "
        "auto_resume=false to train from scratch"
    )
    assert resume_from(resume_config(tmp_path, auto_resume=False)) is None
    assert resume_from(resume_config(tmp_path / "none")) is None  # a first run


def test_explicit_ckpt_path_that_does_not_load_is_one_line_config_error(tmp_path):
    """No fallback: the user named this file."""
    io, good = AtomicCheckpointIO(), tmp_path / "epoch3.ckpt"
    io.save_checkpoint(checkpoint(3), good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:-100])
    not_lightning = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, not_lightning)
    for path, reason in [
        (cut, "truncated or not a checkpoint (not a torch zip archive)"),
        (tmp_path / "nope.ckpt", "cannot read the checkpoint (No such file or directory)"),
        (not_lightning, "not a Lightning checkpoint (no state_dict)"),
    ]:
        with pytest.raises(ConfigError) as refused:
            resume_from(resume_config(tmp_path, ckpt_path=str(path)))
        assert str(refused.value) == f"ckpt_path={path}: {reason}"
    for path in (good, "last", "s3://bucket/run/last.ckpt"):  # the last two: Lightning's
        assert resume_from(resume_config(tmp_path, ckpt_path=str(path))) == str(path)


def test_truncated_last_ckpt_resumes_from_the_previous_one(tmp_path, shapes_dir, caplog):
    """A 4-step run saves last.ckpt at steps 2 and 4; with last.ckpt cut short, the rerun
    resumes from last-previous.ckpt (step 2): steps 2 and 3 are trained again."""
    overrides = ["callbacks.last_checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1"]
    last, _ = train_tiny(tmp_path, shapes_dir, *overrides, steps=4)
    assert torch.load(previous_path(last), weights_only=True)["global_step"] == 2
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    caplog.clear()
    with caplog.at_level(logging.INFO, "polymodal.train"):
        train_tiny(tmp_path, shapes_dir, *overrides, steps=4)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "polymodal.train"]
    assert messages[0][0] == logging.WARNING and f"cannot resume from {last}:" in messages[0][1]
    assert messages[1] == (logging.INFO, f"resuming from {previous_path(last)}")
    assert logged_steps(tmp_path / "csv" / "metrics.csv") == [0, 1, 2, 3, 2, 3]
    steps = [torch.load(p, weights_only=True)["global_step"] for p in (last, previous_path(last))]
    assert steps == [4, 2]  # the damaged file was replaced, not kept as the previous one


def test_metrics_json_is_replaced_atomically(tmp_path):
    path = write_metrics({"b": 2.0, "a": 1.0}, tmp_path)
    assert json.loads(path.read_text()) == {"a": 1.0, "b": 2.0}
    write_metrics({"a": 3.0}, tmp_path)
    assert json.loads(path.read_text()) == {"a": 3.0}
    with pytest.raises(KeyboardInterrupt), atomic_file(path, "w") as f:
        f.write('{"a": ')
        raise KeyboardInterrupt  # dies mid-write: the old file stays whole, no temp is left
    assert json.loads(path.read_text()) == {"a": 3.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
