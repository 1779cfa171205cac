"""End-to-end runs of the training app: every experiment, a learning run, CLI errors."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from polymodal.data.digits import write_digits
from polymodal.data.shapes import write_shapes
from polymodal.train import train
from polymodal.utils.cli import CONFIG_DIR
from tests.helpers import compose_train, logged_steps, train_tiny
from tests.readme import extract_commands

# The README's commands train these as a reader types them (2 steps, checkpoints, final
# metrics; tests/test_readme.py), finetune_digits from clip_digits's checkpoint; this
# test runs every other experiment, and the two whose metrics it checks in their own way
# (trimodal's val sets, lm_shapes's perplexity).
TRAINED_BY_THE_README = {
    "albef",
    "asr_spoken",
    "audio_captioner",
    "clap_sounds",
    "clip",
    "clip_digits",
    "coca",
    "finetune_digits",
    "siglip",
}
EXPERIMENTS = sorted(
    p.stem
    for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")
    if p.stem not in TRAINED_BY_THE_README
)


def test_the_readme_trains_the_experiments_this_file_leaves_out():
    readme = extract_commands(Path(__file__).resolve().parents[2] / "README.md")
    commands = "\n".join(c.text for c in readme if not c.not_run)
    for experiment in TRAINED_BY_THE_README:
        assert re.search(rf"polymodal-train\b[^\n]*experiment={experiment}\b", commands), experiment


AUDIO_DATASETS = {
    "clap_sounds": ["sounds"],
    "audio_captioner": ["sounds"],
    "trimodal": ["sounds"],
    "asr_spoken": ["spoken"],
}


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    return root


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, tmp_path, shapes_dir, digits_dir, request):
    # batches of 32: the run's wiring is under test, not its scale (128 took 2x as long)
    overrides = [
        f"experiment={experiment}",
        "debug=fdr",
        "data.batch_size=32",
        f"paths.digits_dir={digits_dir}",
    ]
    for dataset in AUDIO_DATASETS.get(experiment, ()):  # generated only where they are read
        overrides.append(f"paths.{dataset}_dir={request.getfixturevalue(f'{dataset}_dir')}")
    cfg = compose_train(overrides, tmp_path, shapes_dir)
    metrics = train(cfg)
    assert metrics["train/global_step"] == 1
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    if list(cfg.model.modalities) == ["text"]:  # a language model: perplexity alone
        # one step: about the vocabulary's size (learning: tests/apps/test_lm.py)
        assert 1 < written["val/lm/perplexity"] < 2 * cfg.model.vocab_size
        assert written["val/lm/perplexity"] == pytest.approx(math.exp(written["val/lm/nll"]))
        assert not any("zeroshot" in k or "retrieval" in k for k in written)
        return
    # the summaries of each val set agree with their parts (a wrong or missing value fails)
    sets = {f"val/{name}/": spec.zeroshot for name, spec in cfg.data.val_sets.items()}
    for prefix, zeroshot in (sets or {"val/": cfg.data.zeroshot}).items():
        accs = [written[f"{prefix}zeroshot/{attribute}_acc"] for attribute in zeroshot]
        if accs:  # spoken has no attributes to classify
            assert written[f"{prefix}zeroshot/mean_acc"] == pytest.approx(sum(accs) / len(accs))
        if cfg.task.evaluation.retrieval:
            for way in ("i2t", "t2i"):
                r1, r5 = (
                    written[f"{prefix}retrieval/{way}_r1"],
                    written[f"{prefix}retrieval/{way}_r5"],
                )
                assert 0 <= r1 <= r5 <= written[f"{prefix}retrieval/{way}_r10"] <= 1 and r5 > 0
            mean_r1 = (
                written[f"{prefix}retrieval/i2t_r1"] + written[f"{prefix}retrieval/t2i_r1"]
            ) / 2
            assert written[f"{prefix}retrieval/mean_r1"] == pytest.approx(mean_r1)


@pytest.fixture(scope="module")
def learning_shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_learn")
    write_shapes(root, num_train=4096, num_val=256, num_test=16, shard_size=1024, seed=1)
    return root


def test_short_run_learns_above_chance(tmp_path, learning_shapes):
    """~150 steps on CPU: loss falls and zero-shot colour accuracy clears chance (1/8)."""
    overrides = [
        "logger=csv",
        "callbacks=default",
        "trainer.max_steps=150",
        "callbacks.last_checkpoint.every_n_train_steps=50",
        "trainer.val_check_interval=150",
        "trainer.log_every_n_steps=10",
        "data.batch_size=64",
        "data.num_workers=1",
        "task.scheduler.warmup_steps=20",
        "~callbacks.rich_progress_bar",
    ]
    metrics = train(compose_train(overrides, tmp_path, learning_shapes))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 5
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert metrics["val/zeroshot/color_acc"] > 0.4
    with open(tmp_path / "csv" / "metrics.csv") as f:
        mfu = [float(r["train/mfu"]) for r in csv.DictReader(f) if r.get("train/mfu")]
    assert mfu and all(0 < m < 1 for m in mfu)
    assert metrics["val/zeroshot/mean_acc"] > 0.3
    assert metrics["val/retrieval/t2i_r10"] > 10 / 256
    last = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert last["global_step"] == 150  # refreshed at the end even if the best did not improve
    assert len(list((tmp_path / "checkpoints").glob("best-step*.ckpt"))) == 1


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polymodal.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data=no_such_dataset", "data/no_such_dataset"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("data.batch_size=big", "data.batch_size"),
        ("trainer.no_such_key=1", "no_such_key"),
        ("model.micro_batch_size=0", "model.micro_batch_size: must be >= 1, got 0"),
    ],
)
def test_bad_override_names_the_key(override, named, tmp_path, shapes_dir):
    out = run_cli(override, f"paths.shapes_dir={shapes_dir}", "data.prepare=null", cwd=tmp_path)
    assert out.returncode != 0
    assert named in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("sharing", ["multiway", "shared"])
def test_every_objective_runs_with_weight_sharing(sharing, tmp_path, shapes_dir):
    """FLAVA (ITC + ITM + MLM + MIM) plus captioning and SigLIP added from the command line."""
    overrides = [
        "experiment=flava",
        f"model.sharing={sharing}",
        "+task.objectives.caption.weight=1.0",
        "+task.objectives.siglip.weight=0.5",
        "debug=fdr",
        "data.batch_size=32",  # the wiring is under test, not the scale
    ]
    metrics = train(compose_train(overrides, tmp_path, shapes_dir))
    for name in ("itc", "itm", "mlm", "mim", "caption", "siglip"):
        assert f"val/{name}/loss" in metrics
    assert "val/caption/bleu4" in metrics
    samples = (tmp_path / "samples" / "captions_step1.jsonl").read_text().splitlines()
    assert samples and all({"generated", "reference"} <= json.loads(s).keys() for s in samples)


def test_wandb_offline_run_writes_a_local_run(tmp_path, shapes_dir, monkeypatch):
    wandb_data_dir = tmp_path / "wandb_data"
    monkeypatch.setenv("WANDB_DATA_DIR", str(wandb_data_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [
        "logger=wandb",
        "~callbacks",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    train(compose_train(overrides, tmp_path, shapes_dir))
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    # media, read back from the offline run's files, from the validation at step 2 and
    # the app's final one: a confusion-matrix image per attribute in the run's files, and
    # the retrieval table (image, caption, top-5 retrieved captions), whose rows wandb
    # stages as an artifact until `wandb sync`
    media = runs[0].parent / "files" / "media"
    for attribute in ("shape", "color", "size", "position"):
        pngs = list((media / "images" / "val").glob(f"confusion_{attribute}_*.png"))
        assert len(pngs) == 2 and all(Image.open(png).size[0] > 100 for png in pngs)
    assert len(list((media / "table" / "val").glob("retrieval_*.table.json"))) == 2
    staged = list((wandb_data_dir / "artifacts" / "staging").iterdir())
    tables = [json.loads(f.read_text()) for f in staged if f.read_bytes()[:1] == b"{"]
    tables = [t for t in tables if t.get("_type") == "table"]
    columns = ["image", "sample", "caption", *(f"retrieved_{i}" for i in "12345")]
    assert tables and all(t["columns"] == columns for t in tables)
    table = tables[0]
    assert len(table["data"]) == 8
    first = table["data"][0]
    assert first[0]["_type"] == "image-file" and first[0]["width"] == 64
    assert all(isinstance(text, str) and text for text in first[2:])
    assert sum(f.read_bytes()[:4] == b"\x89PNG" for f in staged) == 2 * 8
    # the same pictures on disk, wandb or not
    assert (tmp_path / "media" / "confusion_shape_step2.png").exists()
    lines = (tmp_path / "media" / "retrieval_step2.csv").read_text().splitlines()
    rows = list(csv.reader(lines))
    assert rows[0] == table["columns"][1:] and rows[1] == first[1:]


def test_multirun_sweep_writes_one_output_dir_per_point(tmp_path, shapes_dir):
    """As a user types it: no hydra.sweep.dir (its default resolves before Hydra's runtime
    config exists, so it must not need ${hydra:runtime.cwd}). A point with a bad value
    fails alone, in one line: the other points still run, and the sweep exits 1."""
    out = run_cli(
        "-m",
        "debug=fdr",
        "data.batch_size=-4,8,16",
        f"paths.shapes_dir={shapes_dir}",
        "data.prepare=null",
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert "error: data.batch_size: must be >= 1, got -4" in out.stderr.splitlines()
    assert "Traceback" not in out.stderr
    results = sorted((tmp_path / "logs" / "debug" / "multiruns").glob("*/*/metrics.json"))
    assert [p.parent.name for p in results] == ["1", "2"]


def test_temperature_is_clamped_once_per_optimizer_step(tmp_path, shapes_dir, monkeypatch):
    """With gradient accumulation the clamp runs per optimizer step, not per batch."""
    from polymodal.models.model import PolymodalModel

    calls = []
    clamp = PolymodalModel.after_optimizer_step
    monkeypatch.setattr(
        PolymodalModel, "after_optimizer_step", lambda self: calls.append(1) or clamp(self)
    )
    overrides = [
        "logger=csv",
        "~callbacks",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=2",
        "trainer.val_check_interval=6",
        "+trainer.limit_val_batches=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    metrics = train(compose_train(overrides, tmp_path, shapes_dir))
    assert metrics["train/global_step"] == 3 and len(calls) == 3


def test_micro_batches_train_as_the_whole_batch(tmp_path, shapes_dir, monkeypatch):
    """`model.micro_batch_size=4` with batches of 16: the same losses at every step and
    the same weights after 3 AdamW steps as encoding each batch at once."""
    from polymodal.models import model

    chunks = []
    checkpoint = model.checkpoint
    monkeypatch.setattr(
        model, "checkpoint", lambda *a, **k: chunks.append(1) or checkpoint(*a, **k)
    )
    runs = {}
    for micro in ("null", "4"):
        ckpt, _ = train_tiny(
            tmp_path / micro,
            shapes_dir,
            f"model.micro_batch_size={micro}",
            "model.stems.image.conv_stem=false",  # BatchNorm would see each chunk's statistics
            "trainer.log_every_n_steps=1",
            steps=3,
        )
        with open(tmp_path / micro / "csv" / "metrics.csv") as f:
            losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        runs[micro] = losses, state, len(chunks)
    (whole_losses, whole, before), (micro_losses, micro, after) = runs["null"], runs["4"]
    assert before == 0 and after == 3 * 2 * 4  # 3 steps x (image, text) x 4 chunks
    assert len(whole_losses) == 3
    assert micro_losses == pytest.approx(whole_losses, abs=1e-5)
    assert whole.keys() == micro.keys()
    differ = [k for k in whole if not torch.allclose(micro[k], whole[k], atol=1e-5, rtol=0)]
    assert not differ, f"weights differ after 3 steps: {differ}"


@pytest.mark.slow  # ~2-3 min: inductor compiles every block, forward and backward
def test_compiled_model_trains_as_eager(tmp_path, shapes_dir):
    """model.compile=true: the same loss as eager at each of 5 steps (rtol 1e-4), and a
    checkpoint with the eager model's keys."""
    losses, keys = {}, {}
    for compiled in ("false", "true"):
        ckpt, _ = train_tiny(
            tmp_path / compiled,
            shapes_dir,
            f"model.compile={compiled}",
            "trainer.log_every_n_steps=1",
            steps=5,
        )
        with open(tmp_path / compiled / "csv" / "metrics.csv") as f:
            losses[compiled] = [
                float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
            ]
        keys[compiled] = set(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    assert len(losses["false"]) == 5
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    assert keys["true"] == keys["false"]


@pytest.mark.slow  # ~1.5 min: three short training runs
def test_ema_weights_are_validated_and_saved(tmp_path, shapes_dir):
    """callbacks=ema with decay 1: the average keeps the weights of the first step (torch's
    AveragedModel copies the weights at its first update), so a 3-step run validates,
    reports and saves exactly the weights of a 1-step run without EMA."""
    overrides = [
        "logger=csv",
        "callbacks=ema",
        "~callbacks.rich_progress_bar",
        "callbacks.ema.decay=1.0",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "+trainer.limit_val_batches=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    ema = train(compose_train(overrides, tmp_path / "ema", shapes_dir))
    one_step, _ = train_tiny(tmp_path / "one", shapes_dir, steps=1)
    assert ema["train/global_step"] == 3
    saved = torch.load(tmp_path / "ema" / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(one_step, weights_only=True)["state_dict"]
    assert saved["state_dict"].keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in saved["state_dict"].items())
    # the training weights go on in the checkpoint, for a resumed run
    three_steps, _ = train_tiny(tmp_path / "three", shapes_dir, steps=3)
    current = torch.load(three_steps, weights_only=True)["state_dict"]
    assert all(torch.equal(v, current[k]) for k, v in saved["current_model_state"].items())
    with open(tmp_path / "one" / "metrics.json") as f:
        one = json.load(f)
    assert ema["val/zeroshot/mean_acc"] == one["val/zeroshot/mean_acc"]
    assert ema["val/loss"] == pytest.approx(one["val/loss"], abs=1e-6)


def test_bf16_mixed_fast_run(tmp_path, shapes_dir):
    cfg = compose_train(["debug=fdr", "trainer.precision=bf16-mixed"], tmp_path, shapes_dir)
    metrics = train(cfg)
    assert metrics["train/global_step"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_rerun_in_the_same_output_dir_resumes_from_last_ckpt(tmp_path, shapes_dir):
    """auto_resume: the second run continues at step 4 and the CSV history keeps growing."""
    base = [
        "logger=csv",
        "callbacks=default",
        "~callbacks.rich_progress_bar",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "trainer.val_check_interval=100",
        "+trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    first = train(compose_train([*base, "trainer.max_steps=4"], tmp_path, shapes_dir))
    assert first["train/global_step"] == 4
    second = train(compose_train([*base, "trainer.max_steps=7"], tmp_path, shapes_dir))
    assert second["train/global_step"] == 7
    assert logged_steps(tmp_path / "csv" / "metrics.csv") == list(range(7))
    # last.ckpt holds the final step (7), not only the last periodic save (6), so running
    # the finished command again trains no step twice
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 7
    again = train(compose_train([*base, "trainer.max_steps=7"], tmp_path, shapes_dir))
    assert again["train/global_step"] == 7
    assert logged_steps(tmp_path / "csv" / "metrics.csv") == list(range(7))
    fresh = compose_train([*base, "trainer.max_steps=2", "auto_resume=false"], tmp_path, shapes_dir)
    assert train(fresh)["train/global_step"] == 2  # auto_resume=false starts over


def test_wandb_run_id_follows_the_output_dir(tmp_path):
    from omegaconf import OmegaConf

    from polymodal.utils.instantiate import wandb_spec

    def run_id(directory: Path) -> str:
        return wandb_spec(OmegaConf.create({"save_dir": str(directory)})).id

    assert run_id(tmp_path / "a") == run_id(tmp_path / "a")
    assert run_id(tmp_path / "a") != run_id(tmp_path / "b")
