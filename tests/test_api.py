"""`polymodal.load`: a checkpoint of a short run, used from Python without config files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import polymodal
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.train import train
from tests.conftest import compose_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir):
    """(checkpoint path, composed config) of a 2-step CLIP run."""
    out = tmp_path_factory.mktemp("run")
    overrides = [
        "logger=csv",
        "callbacks=default",
        "~callbacks.rich_progress_bar",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    cfg = compose_train(overrides, out, shapes_dir)
    train(cfg)
    return next((out / "checkpoints").glob("best-step*.ckpt")), cfg


def val_samples(shapes_dir, count: int = 6) -> tuple[list[Image.Image], list[str]]:
    shard = sorted((shapes_dir / "val").glob("*.tar"))[0]
    images, texts = [], []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name.endswith(".png") and len(images) < count:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            elif member.name.endswith(".txt") and len(texts) < count:
                texts.append(data.decode())
    return images, texts


def test_load_reproduces_the_training_modules_embeddings(trained, shapes_dir):
    checkpoint, cfg = trained
    model = polymodal.load(checkpoint)
    images, texts = val_samples(shapes_dir)

    # the module as training built it, with the weights of the same checkpoint
    module = instantiate(cfg.task, backbone=instantiate(cfg.model)).eval()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    tokenizer = TextTokenizer(cfg.data.tokenizer, cfg.data.context_length)
    transform = image_transform(cfg.data.image_size, train=False)
    with torch.no_grad():
        expected_images = module.backbone.embed_image(torch.stack([transform(i) for i in images]))
        expected_texts = module.backbone.embed_text(*tokenizer.encode(texts))

    torch.testing.assert_close(model.encode_image(images), expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(texts), expected_texts, atol=1e-5, rtol=0)
    assert model.tokenizer.encode(texts)[0].equal(tokenizer.encode(texts)[0])


def test_zero_shot_returns_class_probabilities(trained, shapes_dir):
    model = polymodal.load(trained[0])
    images, _ = val_samples(shapes_dir, 4)
    probs = model.zero_shot(images, ["red", "green", "blue"], ["a {} shape", "something {}"])
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))


def test_load_rejects_a_foreign_checkpoint(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a polymodal checkpoint"):
        polymodal.load(path)


def test_generate_captions_with_a_decoder_checkpoint(tmp_path, shapes_dir):
    overrides = [
        "experiment=captioner",
        "logger=csv",
        "callbacks=default",
        "~callbacks.rich_progress_bar",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "+trainer.limit_val_batches=1",
        "data.batch_size=8",
        "data.num_workers=0",
    ]
    train(compose_train(overrides, tmp_path, shapes_dir))
    model = polymodal.load(next((tmp_path / "checkpoints").glob("best-step*.ckpt")))
    images, _ = val_samples(shapes_dir, 3)
    captions = model.generate(images, strategy="greedy", max_length=8)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_embed_cli_writes_embeddings_keys_and_meta(trained, shapes_dir, tmp_path):
    checkpoint, _ = trained
    shards = str(shapes_dir / "val" / "*.tar")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "polymodal.embed",
            f"ckpt_path={checkpoint}",
            f"shards={shards}",
            f"out_dir={tmp_path / 'emb'}",
            "batch_size=50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    image = np.load(tmp_path / "emb" / "image_embeddings.npy")
    text = np.load(tmp_path / "emb" / "text_embeddings.npy")
    keys = (tmp_path / "emb" / "keys.txt").read_text().split()
    metas = [
        json.loads(line) for line in (tmp_path / "emb" / "meta.jsonl").read_text().splitlines()
    ]
    assert image.shape == text.shape == (128, 128) and len(keys) == len(metas) == 128
    assert keys[0] == "val_00000000" and "shape" in metas[0]
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    images, _ = val_samples(shapes_dir, 2)
    expected = polymodal.load(checkpoint).encode_image(images).numpy()
    np.testing.assert_allclose(image[:2], expected, atol=1e-5)

    bad = subprocess.run(
        [sys.executable, "-m", "polymodal.embed", f"ckpt_path={checkpoint}", "shards=/nope/*.tar"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert (
        bad.returncode == 1
        and bad.stderr.strip() == "error: shards: no shard matches '/nope/*.tar'"
    )


def test_eval_app_runs_every_shapes_benchmark(trained, shapes_dir, tmp_path):
    checkpoint, _ = trained
    run_dir = tmp_path / "eval"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "polymodal.evaluate",
            f"ckpt_path={checkpoint}",
            f"paths.shapes_dir={shapes_dir}",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    assert metrics["val/samples"] == 128 and metrics["test/samples"] == 64
    for key in (
        "val/zeroshot/shape_acc",
        "val/zeroshot/shape_top5",
        "test/retrieval/i2t_r1",
        "linear_probe/color_acc",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    confusion = json.loads((run_dir / "confusion" / "val_shape.json").read_text())
    assert len(confusion["classes"]) == len(confusion["matrix"]) == 8
    matrix = torch.tensor(confusion["matrix"])  # rows true, columns predicted
    accuracy = matrix.trace().item() / matrix.sum().item()
    assert accuracy == pytest.approx(metrics["val/zeroshot/shape_acc"])
    assert "evaluation" in out.stdout
