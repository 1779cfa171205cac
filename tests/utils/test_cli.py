"""The console scripts as a user types them: one-line errors, --help, logs, inspect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from polymodal.data.cli import main as data_cli
from polymodal.utils.callbacks import StepProgressBar
from polymodal.utils.cli import CONFIG_DIR, user_error
from polymodal.utils.errors import ConfigError
from polymodal.utils.validate import RANGES, check_range, check_types
from tests.helpers import tar_members, write_tar

BIN = Path(sys.executable).parent
# a run that fails, if at all, at start-up: the tiny shapes set, no dataset generation
TRAIN = ("debug=fdr", "data.prepare=null")


def run_app(app: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`app` run as typed in a fresh directory, without the user's debug settings."""
    clean = {
        k: v for k, v in os.environ.items() if k not in ("POLYMODAL_DEBUG", "HYDRA_FULL_ERROR")
    }
    return subprocess.run(
        [str(BIN / app), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
    )


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_files")
    (root / "text.txt").write_text("not a checkpoint\n")
    (root / "tokenizer.json").write_text("not json\n")
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, root / "whole.ckpt")
    data = (root / "whole.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return {
        "text": root / "text.txt",
        "tokenizer": root / "tokenizer.json",
        "truncated": root / "truncated.ckpt",
    }


# (app, arguments, the line); {text} etc. are the files of `bad_files`
BAD_INPUTS = [
    ("polymodal-train", ["data.batch_size=-4"], "data.batch_size: must be >= 1, got -4"),
    ("polymodal-train", ["data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
    ("polymodal-train", ["task.optimizer.lr=-1"], "task.optimizer.lr: must be > 0, got -1"),
    (
        "polymodal-train",
        ["data.tokenizer={tokenizer}"],
        "data.tokenizer: {tokenizer}: not a HF tokenizers tokenizer.json "
        "(expected ident at line 1 column 2)",
    ),
    (
        "polymodal-train",
        ["model._target_=nonexistent.Thing"],
        "model._target_: cannot import 'nonexistent.Thing' (No module named 'nonexistent')",
    ),
    (
        "polymodal-train",
        ["ckpt_path={text}"],
        "ckpt_path={text}: truncated or not a checkpoint (not a torch zip archive)",
    ),
    (
        "polymodal-train",
        ["data.batch_sze=4"],
        "Could not override 'data.batch_sze'; To append to your config use +data.batch_sze=4; "
        "Key 'batch_sze' is not in struct",
    ),
    (
        "polymodal-eval",
        ["ckpt_path={truncated}"],
        "{truncated}: truncated or not a checkpoint (not a torch zip archive)",
    ),
    ("polymodal-embed", ["shards=x"], "ckpt_path: required, not set (e.g. ckpt_path=...)"),
]


@pytest.mark.parametrize(
    ("app", "args", "line"), BAD_INPUTS, ids=[" ".join(a) for _, a, _ in BAD_INPUTS]
)
def test_bad_input_is_one_error_line(app, args, line, bad_files, shapes_dir, tmp_path):
    args = [a.format(**bad_files) for a in args]
    paths = [] if app == "polymodal-embed" else [f"paths.shapes_dir={shapes_dir}"]
    extra = TRAIN if app == "polymodal-train" else ()
    out = run_app(app, *paths, *extra, *args, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.splitlines() == [f"error: {line.format(**bad_files)}"], out.stderr[-2000:]


def test_debug_shows_the_traceback(shapes_dir, tmp_path):
    out = run_app(
        "polymodal-train",
        f"paths.shapes_dir={shapes_dir}",
        *TRAIN,
        "data.batch_size=-4",
        cwd=tmp_path,
        POLYMODAL_DEBUG="1",
    )
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ConfigError: data.batch_size: must be >= 1" in out.stderr


def test_train_log_holds_the_runs_log_records(shapes_dir, tmp_path):
    """Lightning's records and the final metrics reach train.log, not only the console."""
    run_dir = tmp_path / "run"
    out = run_app(
        "polymodal-train",
        f"paths.shapes_dir={shapes_dir}",
        *TRAIN,
        "data.batch_size=16",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert "[lightning.pytorch" in log and "GPU available" in log
    assert "final validation metrics: {" in log and '"val/zeroshot/mean_acc"' in log
    assert "INFO: " not in out.stderr  # Lightning's own handler no longer prints them again


@pytest.mark.parametrize(
    ("app", "own", "others"),
    [
        (
            "polymodal-train",
            ["data", "model", "task", "trainer", "logger", "callbacks", "experiment", "debug"],
            ["eval"],
        ),
        ("polymodal-eval", ["eval", "paths", "ckpt_path"], ["data", "experiment", "trainer"]),
        ("polymodal-embed", ["ckpt_path", "shards", "out_dir"], ["eval", "data", "experiment"]),
    ],
)
def test_help_shows_the_apps_own_groups(app, own, others, tmp_path):
    out = run_app(app, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{app}: ")
    for name in own:
        assert re.search(rf"^{name}:", out.stdout, re.MULTILINE), name
    for name in others:
        assert not re.search(rf"^{name}:", out.stdout, re.MULTILINE), name
    assert "POLYMODAL_DEBUG=1" in out.stdout


def test_data_subcommands_have_a_description(capsys):
    for command in ("build", "inspect", "verify", "shapes"):
        with pytest.raises(SystemExit):
            data_cli([command, "--help"])
        usage, description = capsys.readouterr().out.split("\n\n")[:2]
        assert usage.startswith(f"usage: polymodal-data {command}") and len(description) > 20


def test_ranges_are_a_table_of_keys():
    check_range("data.batch_size", 1)
    check_range("task.objectives.mim.mask_ratio", 0.75)
    check_range("data.val_batch_size", None)  # None: off, where the type allows it
    check_range("not.in.the.table", -1)
    for key, value, message in [
        ("data.batch_size", -4, "data.batch_size: must be >= 1, got -4"),
        ("task.optimizer.lr", 0.0, "task.optimizer.lr: must be > 0, got 0.0"),
        ("task.objectives.mim.mask_ratio", 1.0, "must be in [0, 1), got 1.0"),
        ("data.crop_scale", [0.0, 1.0], "data.crop_scale: must be in (0, 1], got [0.0, 1.0]"),
        ("trainer.max_steps", -1, "trainer.max_steps: must be >= 1, got -1"),
        ("data.num_workers", "two", "data.num_workers: must be >= 0, got 'two'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_range(key, value)
    # every plain key of the table names a key of the train or eval config (no typos)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        out = ["paths.output_dir=out"]  # Hydra's run dir is not set outside an app
        configs = [compose("train", overrides=out), compose("eval", overrides=["ckpt_path=x"])]
    missing = object()
    for key in (k for k in RANGES if "*" not in k):
        assert any(OmegaConf.select(c, key, default=missing) is not missing for c in configs), key
    # and a key its `_target_` does not take fails before the constructor does
    with open_dict(configs[0]):
        configs[0].model.foo = 1
    with pytest.raises(ConfigError, match="^model.foo: not a parameter of polymodal.models"):
        check_types(configs[0])


def test_user_errors_and_bugs():
    assert user_error(ConfigError("data.x: bad")) == "data.x: bad"
    assert user_error(FileNotFoundError(2, "No such file or directory", "/a/b")) == (
        "/a/b: No such file or directory"
    )
    worker = ConfigError(  # as torch re-raises it from a DataLoader worker
        "Caught ConfigError in DataLoader worker process 0.\nOriginal Traceback "
        '(most recent call last):\n  File "x.py"\nConfigError: shards: bad'
    )
    assert (
        user_error(worker)
        == "Caught ConfigError in DataLoader worker process 0; ConfigError: shards: bad"
    )
    bugs = (KeyError("k"), ZeroDivisionError(), TypeError("t"), RuntimeError("r"), ValueError("v"))
    for bug in bugs:
        assert user_error(bug) is None


def test_step_progress_bar_counts_steps_not_epochs():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=1500, max_epochs=-1)
    assert bar.total_train_batches == 1500
    assert bar._get_train_description(3) == "Epoch 3 · step"


def write_shard(path: Path, samples: int, bad: int, source: Path) -> None:
    """`samples` samples copied from the first of `source`'s shards, the first `bad` of
    them with an image that does not decode."""
    members = list(tar_members(next(source.glob("*.tar"))).items())
    out = []
    for i in range(samples):
        for name, data in members[:3]:  # one sample's png, txt, json
            extension = name.split(".", 1)[1]
            data = b"not an image" if extension == "png" and i < bad else data
            out.append((f"s{i:05d}.{extension}", data))
    write_tar(path, out)


def test_inspect_counts_members_and_bad_samples(shapes_dir, tmp_path, capsys):
    write_shard(tmp_path / "a-000000.tar", samples=300, bad=3, source=shapes_dir / "val")
    assert data_cli(["inspect", str(tmp_path / "*.tar"), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "members: .json x297, .png x297, .txt x297" in out
    assert "bad samples: 3 (corrupt .png (UnidentifiedImageError) x3), e.g. " in out
    assert f"{tmp_path / 'a-000000.tar'}:s00000, {tmp_path / 'a-000000.tar'}:s00001\n" in out
    assert len(out) < 3000 and "\\x" not in out  # counts, never the members' bytes
    assert data_cli(["verify", str(tmp_path / "*.tar")]) == 1
