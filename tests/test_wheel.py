"""The package works installed from its wheel, away from the repo: the configs travel
inside it, and users add their own with --config-dir / hydra.searchpath.

The wheel goes into a fresh venv (not editable); the dependencies come from this venv
through a .pth line (nothing is downloaded), which adds its site-packages to sys.path
without running its .pth files, so the editable install's finder stays out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.readme import working_tree_files

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
# a small shapes dataset, written by the CLI and asked for by the runs (same parameters)
SIZES = ["--train", "256", "--val", "64", "--test", "64"]
SHAPES = ["data.prepare.num_train=256", "data.prepare.num_val=64", "data.prepare.num_test=64"]
# a user's own experiment, outside the package
MINE = """# @package _global_
defaults:
  - override /task: siglip
tags: [mine]
"""


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run to completion (in this process's environment unless `env`); its output, shown
    in full when it fails."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output}"
    return output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the working tree, built from a copy of its source files (a build in
    the tree would leave build/ behind)."""
    source = tmp_path_factory.mktemp("source")
    for name in working_tree_files(REPO):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation"]
    run([*build, "--quiet", "-w", str(out)], cwd=source)
    return next(out.glob("polymodal-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding the wheel, and the environment of a user who activated it."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    run([*pip, "--no-deps", "--no-index", str(wheel)], cwd=venv.parent)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin", VIRTUAL_ENV=str(venv))
    env.pop("PYTHONPATH", None)
    env.pop("POLYMODAL_ROOT", None)
    return venv, env


def test_wheel_holds_every_config(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = [n for n in working_tree_files(REPO) if n.startswith("src/polymodal/conf/")]
    assert configs
    missing = [n for n in configs if n.removeprefix("src/") not in names]
    assert not missing, f"not in the wheel: {missing}"


def test_installed_package_is_the_wheel(installed, tmp_path) -> None:
    venv, env = installed
    code = "import polymodal; print(polymodal.__file__)"
    location = Path(run(["python", "-c", code], cwd=tmp_path, env=env).strip())
    assert location.is_relative_to(venv), f"polymodal imported from {location}, not the wheel"
    help_text = run(["polymodal-train", "--help"], cwd=tmp_path, env=env)
    assert "clip_shapes" in help_text and "ddp_sim" in help_text, help_text  # configs found


def test_installed_app_trains_and_evaluates(installed, tmp_path) -> None:
    """From a directory with no repo around: data, a debug run with the user's own
    experiment (--config-dir), a short run finding it by hydra.searchpath, evaluation."""
    _, env = installed
    run(["polymodal-data", "shapes", "--out", "data/shapes"] + SIZES, cwd=tmp_path, env=env)
    (tmp_path / "myconf" / "experiment").mkdir(parents=True)
    (tmp_path / "myconf" / "experiment" / "mine.yaml").write_text(MINE)

    run(
        ["polymodal-train", "--config-dir", "myconf", "experiment=mine", "debug=fdr", *SHAPES],
        cwd=tmp_path,
        env=env,
    )
    (debug_run,) = (tmp_path / "logs" / "debug" / "runs").iterdir()
    metrics = json.loads((debug_run / "metrics.json").read_text())
    assert any(k.startswith("val/siglip/") for k in metrics), sorted(metrics)  # mine.yaml

    search = ["hydra.searchpath=[file://myconf]", "experiment=mine", "trainer.max_steps=2"]
    run(["polymodal-train", *search, *SHAPES], cwd=tmp_path, env=env)
    (train_run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = json.loads((train_run / "metrics.json").read_text())
    assert any(k.startswith("val/siglip/") for k in metrics), sorted(metrics)

    checkpoint = train_run / "checkpoints" / "last.ckpt"
    run(["polymodal-eval", f"ckpt_path={checkpoint}", "eval=shapes"], cwd=tmp_path, env=env)
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    assert json.loads((eval_run / "eval_metrics.json").read_text())
