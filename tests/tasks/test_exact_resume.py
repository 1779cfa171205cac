"""Exact resume: a run killed with SIGKILL between checkpoints and resumed from its
last.ckpt ends with the same bits as a run that was never interrupted, and reads every
sample exactly once per epoch (no batch of the interrupted epoch replayed or lost)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import tar_members, write_tar

TESTS = Path(__file__).resolve().parents[1]  # faults.py
STEPS, SAVE_EVERY, KILL_AT, BATCH = 36, 7, 27, 16  # 512 train samples: 32 steps an epoch
# last.ckpt at step 21: odd, so with 2 loader workers the resumed epoch starts at worker 1
# a smaller model than tiny: the test is about the stream and the state, not the size
SMALL = ["model.towers.image.depth=1", "model.towers.text.depth=1", "model.fusion.depth=1"]


def run_train(out: Path, shapes_dir: Path, record: Path, *extra: str, kill_at: int | None = None):
    overrides = [
        f"paths.output_dir={out}",
        f"paths.shapes_dir={shapes_dir}",
        "data.prepare=null",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        f"callbacks.last_checkpoint.every_n_train_steps={SAVE_EVERY}",
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=15",
        "+trainer.limit_val_batches=1",
        "task.evaluation.media_samples=0",  # pictures cost a third of each run here
        f"data.batch_size={BATCH}",
        "+callbacks.recorder._target_=faults.StepRecorder",
        f"+callbacks.recorder.path={record}",
        f"+callbacks.recorder.kill_at={'null' if kill_at is None else kill_at}",
        *SMALL,
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "polymodal.train", *overrides],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def trained_keys(record: Path) -> dict[int, list[str]]:
    """step -> keys of the batch that step trained on (a resumed step's later record wins)."""
    steps = {}
    for line in record.read_text().splitlines():
        row = json.loads(line)
        steps[row["step"]] = row["keys"]
    return steps


def final_state(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    return {"weights": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"]}


def assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max |d| {(a - b).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def damaged_shapes(shapes_dir, tmp_path_factory) -> Path:
    """The shapes set with every 50th training image replaced by bytes that don't decode."""
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(shapes_dir, root, dirs_exist_ok=True)
    for shard in sorted((root / "train").glob("*.tar")):
        members = tar_members(shard).items()
        damaged = [
            (name, b"not an image" if name.endswith(".png") and index % 150 == 0 else data)
            for index, (name, data) in enumerate(members)
        ]
        write_tar(shard, damaged)
    return root


# deterministic=true: ALBEF's backward on CPU is not bitwise repeatable without it (two
# uninterrupted runs differ by ~1e-7); a resume can only be as exact as the run itself
CASES = {
    "clip-workers0": ("clip_shapes", 0, []),
    "clip-workers2-resampled": (
        "clip_shapes",
        2,
        ["data.resampled=true", "data.train_samples=512"],
    ),
    "albef-workers0-bad-samples": ("albef", 0, ["trainer.deterministic=true"]),
    # audio: random crops of 2 s clips to 1.5 s and SpecAugment masks drawn in the workers
    "clap-workers2-crop-specaugment": (
        "clap_sounds",
        2,
        [
            "data.audio.seconds=1.5",
            "data.audio.spec_augment={freq_masks:2,freq_width:8,time_masks:2,time_width:10}",
            "model.towers.audio.depth=1",
        ],
    ),
    # shapes and sounds batches mixed by weight (one source per batch, drawn per cursor)
    "trimodal-workers2-mixed-sources": ("trimodal", 2, ["model.towers.audio.depth=1"]),
}


# ~2-3 min each; .ci/run runs them
SLOW = (
    "clip-workers2-resampled",
    "clap-workers2-crop-specaugment",
    "trimodal-workers2-mixed-sources",
)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else []) for c in CASES]
)
def test_killed_run_resumes_bitwise_equal(case, tmp_path, shapes_dir, request):
    experiment, workers, extra = CASES[case]
    if "bad-samples" in case:
        shapes_dir = request.getfixturevalue("damaged_shapes")
    if experiment in ("clap_sounds", "trimodal"):
        extra = [f"paths.sounds_dir={request.getfixturevalue('sounds_dir')}", *extra]
    if experiment == "trimodal":  # the shapes tokenizer reads sounds captions too (bytes)
        extra = [f"data.tokenizer={shapes_dir / 'tokenizer.json'}", *extra]
    extra = [f"experiment={experiment}", f"data.num_workers={workers}", *extra]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for out in (whole, broken):
        out.mkdir()
    done = run_train(whole, shapes_dir, tmp_path / "whole.jsonl", *extra)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = run_train(broken, shapes_dir, tmp_path / "broken.jsonl", *extra, kill_at=KILL_AT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == KILL_AT // SAVE_EVERY * SAVE_EVERY  # 21, not 27
    resumed = run_train(broken, shapes_dir, tmp_path / "broken.jsonl", *extra)  # auto_resume
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    whole_keys = trained_keys(tmp_path / "whole.jsonl")
    broken_keys = trained_keys(tmp_path / "broken.jsonl")
    assert sorted(broken_keys) == list(range(STEPS))
    assert broken_keys == whole_keys  # the same batch at every step, replayed steps included
    # samples may repeat by design when resampled or skipped; sounds has 256, not 512
    if not any(k in case for k in ("resampled", "bad", "clap", "mixed")):
        per_epoch = 512 // BATCH
        first = Counter(k for s in range(per_epoch) for k in broken_keys[s])
        assert len(first) == 512 and set(first.values()) == {1}
        second = Counter(k for s in range(per_epoch, STEPS) for k in broken_keys[s])
        assert set(second.values()) == {1}  # the second epoch, so far, without repeats
    assert_bitwise_equal(final_state(whole), final_state(broken))
    # the counts of skipped samples continue across the resume (nothing counted twice)
    whole_metrics, broken_metrics = (
        json.loads((o / "metrics.json").read_text()) for o in (whole, broken)
    )
    skipped = {k: v for k, v in whole_metrics.items() if k.startswith("data/skipped")}
    assert skipped == {k: v for k, v in broken_metrics.items() if k.startswith("data/skipped")}
    assert (skipped["data/skipped_samples"] > 0) == ("bad" in case)
