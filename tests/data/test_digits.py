"""The digits dataset: scikit-learn's real scans as shards, its CLI, config, training, eval."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from sklearn.datasets import load_digits

from polymodal.data.cli import main
from polymodal.data.digits import DIGITS, ensure_digits, write_digits
from polymodal.evaluate import evaluate
from polymodal.train import train
from polymodal.utils.cli import CONFIG_DIR
from tests.helpers import compose_train, samples_by_key, tar_members

# 8 px: the PNG holds the scan's own pixels, so they can be compared exactly
SMALL = {"num_val": 150, "num_test": 300, "image_size": 8, "shard_size": 400}
COUNTS = {"train": 1797 - 450, "val": 150, "test": 300}


def _digests(root: Path) -> dict[str, str]:
    files = [*sorted(root.glob("*/*.tar")), root / "tokenizer.json"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("*.tar")):
        samples.update(samples_by_key(tar_members(shard)))
    return samples


def _rows(root: Path, split: str) -> list[int]:
    return [json.loads(s["json"])["index"] for s in _samples(root, split).values()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("digits")
    return root, write_digits(root, seed=0, **SMALL)


@pytest.fixture(scope="module")
def digits32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default build (32 px), as training reads it."""
    root = tmp_path_factory.mktemp("digits32")
    write_digits(root)
    return root


def test_every_scan_once_with_its_label_and_pixels(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    digits = load_digits()
    seen = []
    for split, count in COUNTS.items():
        assert manifest["splits"][split]["num_samples"] == count
        sizes = json.loads((root / split / "sizes.json").read_text())
        assert sum(sizes.values()) == count
        samples = _samples(root, split)
        assert len(samples) == count
        labels = []
        for key, sample in samples.items():
            assert sample.keys() == {"png", "txt", "json"}
            meta = json.loads(sample["json"])
            row, label = meta["index"], meta["label"]
            assert key == f"{split}_{row:04d}"
            assert label == digits.target[row] and meta["digit"] == DIGITS[label]
            image = Image.open(io.BytesIO(sample["png"]))
            assert image.mode == "RGB" and image.size == (8, 8)
            pixels = np.asarray(image)
            expected = np.rint(digits.images[row] * 255 / 16)  # white ink on black
            assert all(np.array_equal(pixels[..., c], expected) for c in range(3))
            labels.append(label)
            seen.append(row)
        # stratified: every class, in the proportion it has in the whole set
        per_class = np.bincount(labels, minlength=10)
        expected_counts = np.bincount(digits.target) * count / len(digits.target)
        assert per_class.min() > 0 and np.abs(per_class - expected_counts).max() <= 1
    assert sorted(seen) == list(range(1797))


def test_manifest_and_captions(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["attributes"] == {"digit": list(DIGITS)}
    assert manifest["splits"]["train"]["pattern"] == "train/digits-{000000..000003}.tar"
    assert (root / manifest["tokenizer"]).is_file()
    texts = [(s["txt"].decode(), json.loads(s["json"])) for s in _samples(root, "train").values()]
    with_word = sum(bool(re.search(rf"\b{meta['digit']}\b", text)) for text, meta in texts)
    assert all(meta["digit"] in text or str(meta["label"]) in text for text, meta in texts)
    assert with_word > 0.7 * len(texts)
    assert len({text for text, _ in texts}) > 30  # several templates per digit


def test_deterministic_and_seeded(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = dataset
    write_digits(tmp_path / "same", seed=0, **SMALL)
    write_digits(tmp_path / "other", seed=1, **SMALL)
    assert _digests(tmp_path / "same") == _digests(root)
    for split in COUNTS:
        assert _rows(tmp_path / "other", split) != _rows(root, split)


def test_ensure_does_not_rewrite(tmp_path: Path) -> None:
    first = ensure_digits(tmp_path, **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert ensure_digits(tmp_path, **SMALL) == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes
    changed = ensure_digits(tmp_path, **{**SMALL, "shard_size": 2000})
    assert changed["splits"]["train"]["num_shards"] == 1
    assert [p.name for p in (tmp_path / "train").glob("*.tar")] == ["digits-000000.tar"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["digits", "--out", str(tmp_path), "--val", "20", "--test", "30", "--image-size", "8"]
    assert main(argv) == 0
    assert "digits: train=1747 val=20 test=30" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["params"]["num_test"] == 30
    assert main([*argv, "--force", "--seed", "3"]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["params"]["seed"] == 3


@pytest.mark.parametrize(
    "sizes", [["--val", "1000", "--test", "797"], ["--val", "-1"], ["--test", "5"]]
)
def test_cli_rejects_impossible_sizes(
    sizes: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["digits", "--out", str(tmp_path), *sizes]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: digits: ") and err.count("\n") == 1
    assert not (tmp_path / "manifest.json").exists()


def test_data_config_prepares_and_reads_a_batch(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.root_dir={tmp_path}", "data=digits", "data.num_workers=0"],
        )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # writes the dataset into paths.digits_dir
    assert (tmp_path / "data" / "digits" / "manifest.json").is_file()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (64, 3, 32, 32)
    assert batch["text_ids"].shape == (64, 16)
    assert {meta["digit"] for meta in batch["meta"]} <= set(DIGITS)
    # the 32 px image is the scan scaled up: averaging 4x4 blocks gives it back closely
    sample = next(iter(_samples(tmp_path / "data" / "digits", "test").values()))
    image = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=float)[..., 0]
    scan = load_digits().images[json.loads(sample["json"])["index"]] * 255 / 16
    assert np.abs(image.reshape(8, 4, 8, 4).mean(axis=(1, 3)) - scan).mean() < 20


def test_training_and_eval_smoke(tmp_path: Path, digits32: Path) -> None:
    overrides = [
        "experiment=clip_digits",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "+trainer.limit_val_batches=1",
        "data.val_batch_size=50",
        "data.num_workers=0",
        f"paths.digits_dir={digits32}",
    ]
    metrics = train(compose_train(overrides, tmp_path, tmp_path))
    assert metrics["train/global_step"] == 3
    assert metrics["val/zeroshot/mean_acc"] == metrics["val/zeroshot/digit_acc"]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={ckpt}",
                "eval=digits",
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / 'eval'}",
                f"paths.digits_dir={digits32}",
            ],
        )
    results = evaluate(cfg, tmp_path / "eval")
    confusion = json.loads((tmp_path / "eval" / "confusion" / "test_digit.json").read_text())
    matrix = torch.tensor(confusion["matrix"])  # rows true, columns predicted: 250 samples
    assert matrix.sum() == 250 and confusion["classes"] == list(DIGITS)
    assert results["test/zeroshot/digit_acc"] == pytest.approx(matrix.trace() / 250)
    assert results["test/samples"] == 250
    assert not any(key.startswith("test/retrieval") for key in results)
    assert results["linear_probe/digit_acc"] > 0.5  # frozen features of the scans separate
