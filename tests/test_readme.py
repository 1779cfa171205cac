"""The README (and docs/*.md) is executable: every command of its bash and python blocks
runs as written, in document order, in one fresh directory per document (a reader's
session: the dataset generated once, checkpoints reused by later commands).

What the test adds to what a reader types, and nothing else:
- size arguments appended to long commands (`trainer.max_steps=2`, a small shapes dataset,
  two Optuna trials, small shards; see `ci_arguments`);
- placeholders a reader fills in (`<time>`, `<dir>`, `<run_dir>`) replaced by the real
  newest run directory (`readme.substitute_placeholders`);
- the files a reader brings (a.png, b.png, a caption table with images, COCO captions,
  audio clips), written into the fresh directory first (`write_reader_inputs`);
- `make ...` runs in a git clone of the repo whose .venv is this one (`make setup` is
  then a no-op).

A command that cannot run here carries `# not run in CI: <reason>` in the README; an
unmarked command that fails fails the test, so new README commands are covered.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from PIL import Image

from polymodal.utils.cli import CONFIG_DIR
from tests.readme import (
    Command,
    extract_commands,
    substitute_placeholders,
    working_tree_files,
)

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = [command for doc in DOCS for command in extract_commands(doc)]
VENV = Path(sys.prefix)  # the venv running the tests, as if the reader had activated it
TIMEOUT_S = 600
# the shapes dataset a reader's first run would render (50k images), kept small
SHAPES_SIZES = {"num_train": 256, "num_val": 64, "num_test": 64}
# the same for every built-in dataset a run generates, by its prepare function
PREPARE_SIZES = {
    "ensure_shapes": SHAPES_SIZES,
    "ensure_sounds": {"num_train": 256, "num_val": 64, "num_test": 32},
    "ensure_spoken": {"num_train": 160, "num_val": 32, "num_test": 16},  # >= a batch
}
TRAIN_ARGUMENTS = ["trainer.max_steps=2"]  # writes a checkpoint and metrics.json
# size arguments of scripts, by the name of their file
SCRIPT_ARGUMENTS = {
    "clip_step.py": ["--steps", "2", "--batch-sizes", "8", "--precisions", "32"],
    "data_pipeline.py": ["--images", "16", "--sizes", "64", "--workers", "1"],
    "retrieval.py": ["--images", "200", "--chunk-sizes", "64"],
    "generation.py": ["--batches", "1", "--max-length", "8"],
    "recipes.py": TRAIN_ARGUMENTS,
}
# commands that start several training processes (ranks, sweep jobs, trials): minutes each
# on a 2-core CPU, so they run with the slow tests (`make test-all`, which .ci/run runs)
SLOW = re.compile(r"trainer=(ddp_sim|fsdp)|hydra/launcher=local|hparams_search=")
SUMMARY: dict[str, list[str]] = {
    "run verbatim": [],
    "run with size arguments": [],
    "run with placeholders filled in": [],
    "not run in CI": [],
}


def expect_eval_metrics(metrics: list[dict]) -> None:
    """Training on your own shards evaluates them: zero-shot and retrieval metrics."""
    assert metrics, "the command wrote no metrics.json"
    for keys in metrics:
        assert any(k.startswith("val/zeroshot/") for k in keys), sorted(keys)
        assert any(k.startswith("val/retrieval/") for k in keys), sorted(keys)


def expect_synced_sweep_points(metrics: list[dict]) -> None:
    """DDP (two spawned ranks) inside a multirun: each sweep point ran once, to the end,
    with both ranks' weights equal, and validated (no relaunch of the sweep)."""
    assert len(metrics) == 2, f"{len(metrics)} sweep points wrote metrics.json, not 2"
    for keys in metrics:
        assert keys["train/global_step"] == 2 and keys["dist/ranks_in_sync"] == 1.0, keys
        assert "val/retrieval/i2t_r1" in keys, sorted(keys)


# checks of what a command wrote, by a pattern of its text (given the metrics.json files
# it wrote); every pattern must match some command
EXPECTATIONS: list[tuple[re.Pattern, Callable[[list[dict]], None]]] = [
    (re.compile(r"\bpolymodal-train\b.*\bdata=webdataset\b"), expect_eval_metrics),
    (re.compile(r"\bpolymodal-train -m trainer=ddp_sim\b"), expect_synced_sweep_points),
]


def first_value(override: str) -> str:
    """`key=a,b` (a sweep) -> `key=a`, to compose the config of one of its runs."""
    key, _, value = override.partition("=")
    if "," in value and not value.startswith(("[", "{", "'", '"')):
        value = value.split(",")[0]
    return f"{key}={value}"


def generated_sizes(overrides: list[str]) -> dict[str, int]:
    """The small sizes (config key -> value) of the built-in datasets a `polymodal-train`
    run with these overrides generates (its `data.prepare`), or none: only then do their
    size keys exist.
    Overrides that do not compose are the command's own error to report: then none."""
    plain = [
        first_value(o)
        for o in overrides
        if "=" in o and not o.lstrip("+~").startswith(("-", "hydra.", "hydra/"))
    ]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=plain)
    except HydraException:
        return {}
    prepare = OmegaConf.select(cfg, "data.prepare")
    if prepare is None:
        return {}
    # a mix of sources (data=trimodal) prepares each of its datasets
    steps = {f"data.prepare.datasets.{n}": s for n, s in prepare.get("datasets", {}).items()}
    sizes = {}
    for where, step in (steps or {"data.prepare": prepare}).items():
        target = str(step.get("_target_"))
        sizes.update(
            {f"{where}.{k}": v for k, v in PREPARE_SIZES.get(target.rpartition(".")[2], {}).items()}
        )
    return sizes


def train_arguments(overrides: list[str]) -> list[str]:
    """Size overrides for a `polymodal-train` run (none for --help or --cfg)."""
    if any(o in ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info") for o in overrides):
        return []
    extra = list(TRAIN_ARGUMENTS)
    extra += [f"{k}={v}" for k, v in generated_sizes(overrides).items()]
    if any(o.startswith(("hparams_search=", "hydra.sweeper.n_trials=")) for o in overrides):
        extra.append("hydra.sweeper.n_trials=2")
    return extra


def ci_arguments(argv: list[str]) -> list[str]:
    """The size arguments appended to a command (an empty list: it runs verbatim)."""
    for i, word in enumerate(argv):
        if word == "polymodal-train" or (word == "polymodal.train" and argv[i - 1] == "-m"):
            return train_arguments(argv[i + 1 :])
    if len(argv) > 1 and argv[0] == "polymodal-data" and f"ensure_{argv[1]}" in PREPARE_SIZES:
        sizes = PREPARE_SIZES[f"ensure_{argv[1]}"]
        return [f"--{k[4:]}={v}" for k, v in sizes.items()]  # --train=256 ...
    if argv[:2] == ["polymodal-data", "build"]:
        return ["--shard-size", "2"]  # 20 input rows -> shards 000000..000009
    if argv[:2] == ["make", "train"]:
        args = [a.partition("=")[2] for a in argv if a.startswith("ARGS=")]
        overrides = shlex.split(args[-1]) if args else []
        sizes = [f"data.prepare.{k}={v}" for k, v in SHAPES_SIZES.items()]
        return [shlex.quote("ARGS=" + " ".join([*overrides, "debug=fdr", *sizes]))]
    scripts = [Path(word).name for word in argv[:2] if word.endswith(".py")]
    return SCRIPT_ARGUMENTS.get(scripts[0], []) if scripts else []


def write_reader_inputs(cwd: Path) -> None:
    """The files the README's commands expect a reader to have: two images for the Python
    snippets (a.png, b.png), a caption table with 20 images (captions.tsv, imgs/), COCO
    captions (annotations/, train2017/) and audio clips with captions (clips/, clips.csv)."""
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "purple"]

    def image(path: Path, index: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        pixels[12:36, 16:48] = [(index * 50) % 256, 200, 80]
        Image.fromarray(pixels).save(path)

    image(cwd / "a.png", 0)
    image(cwd / "b.png", 1)
    rows = ["id\tfilepath\ttitle"]
    for i in range(20):
        image(cwd / "imgs" / f"{i:03d}.jpg", i)
        rows.append(f"img{i}\t{i:03d}.jpg\ta {colours[i % 5]} square number {i}")
    (cwd / "captions.tsv").write_text("\n".join(rows) + "\n")
    images, annotations = [], []
    for i in range(4):
        image(cwd / "train2017" / f"{i:012d}.jpg", i)
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48})
        for j in range(2):
            caption = f"a {colours[(i + j) % 5]} square"
            annotations.append({"id": 2 * i + j, "image_id": i, "caption": caption})
    (cwd / "annotations").mkdir()
    coco = {"images": images, "annotations": annotations}
    (cwd / "annotations" / "captions_train2017.json").write_text(json.dumps(coco))
    (cwd / "clips").mkdir()
    table = ["audio,caption"]
    for i in range(3):
        with wave.open(str(cwd / "clips" / f"clip{i}.wav"), "wb") as clip:
            clip.setnchannels(1)
            clip.setsampwidth(2)
            clip.setframerate(16000)
            tone = np.sin(np.arange(8000) * (i + 1) * 0.05) * 8000
            clip.writeframes(tone.astype(np.int16).tobytes())
        table.append(f"clip{i}.wav,a tone number {i}")
    (cwd / "clips.csv").write_text("\n".join(table) + "\n")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Callable[[Path], Path]:
    """The fresh working directory of a document, made with the reader's inputs once and
    shared by all of its commands."""
    made: dict[Path, Path] = {}

    def get(doc: Path) -> Path:
        if doc not in made:
            made[doc] = tmp_path_factory.mktemp(f"readme-{doc.stem}")
            write_reader_inputs(made[doc])
        return made[doc]

    return get


@pytest.fixture(scope="session")
def checkout(tmp_path_factory) -> Path:
    """A git clone of the repo for `make` lines, with the working tree's changes copied
    over it (what is about to be committed) and this .venv; pyproject.toml is dated before
    the venv's install stamp so that `make setup` has nothing to do (it must never
    reinstall the shared venv from the clone)."""
    clone = tmp_path_factory.mktemp("checkout") / "polymodal"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    for name in working_tree_files(REPO):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    (clone / ".venv").symlink_to(VENV)
    os.utime(clone / "pyproject.toml", (0, 0))
    assert subprocess.run(["make", "-q", "setup"], cwd=clone).returncode == 0
    return clone


class Summary:
    """A plugin printing, after the test summary, what ran verbatim, what had size
    arguments or placeholders filled in, and what is marked not run in CI and why."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not any(SUMMARY.values()):
            return
        for outcome, names in SUMMARY.items():
            terminalreporter.write_line(f"README/docs commands {outcome}: {len(names)}")
            for name in names:
                terminalreporter.write_line(f"  {name}")


@pytest.fixture(scope="session", autouse=True)
def summary(request) -> None:
    request.config.pluginmanager.register(Summary(), "readme-summary")


def run(command: list[str], cwd: Path, stdin: str | None = None) -> tuple[int, str]:
    """Run in its own process group (killed whole on time-out); (exit code, output)."""
    env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env["VIRTUAL_ENV"] = str(VENV)
    env.pop("POLYMODAL_ROOT", None)
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(stdin, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -1, f"{output}\n[timed out after {TIMEOUT_S} s]"
    return process.returncode, output


def metrics_files(cwd: Path) -> set[Path]:
    return set(cwd.glob("logs/**/metrics.json"))


def test_expectations_match_commands() -> None:
    """An expectation whose command was renamed would silently check nothing."""
    for pattern, _ in EXPECTATIONS:
        assert any(pattern.search(c.text) for c in COMMANDS), f"no command matches {pattern}"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, id=c.name, marks=[pytest.mark.slow] if SLOW.search(c.text) else [])
        for c in COMMANDS
    ],
)
def test_command(command: Command, workspace, request) -> None:
    if command.not_run:
        SUMMARY["not run in CI"].append(f"{command.name} ({command.not_run})")
        pytest.skip(f"not run in CI: {command.not_run}")
    cwd = workspace(command.doc)
    text = substitute_placeholders(command.text, cwd)
    filled = text != command.text
    extra: list[str] = []
    if command.language == "bash":
        argv = shlex.split(text)
        extra = ci_arguments(argv)
        if argv[0] == "make":
            cwd = request.getfixturevalue("checkout")
    before = metrics_files(cwd)
    if command.language == "python":
        code, output = run([str(VENV / "bin" / "python"), "-"], cwd, stdin=text)
    else:
        text = " ".join([text, *extra])
        code, output = run(["bash", "-euo", "pipefail", "-c", text], cwd)
    outcome = "size arguments" if extra else "placeholders filled in" if filled else None
    SUMMARY[f"run with {outcome}" if outcome else "run verbatim"].append(command.name)
    assert code == 0, f"exit code {code} of\n{text}\nin {cwd}:\n{output[-10000:]}"
    for pattern, check in EXPECTATIONS:
        if pattern.search(command.text):
            new = sorted(metrics_files(cwd) - before)
            check([json.loads(path.read_text()) for path in new])
