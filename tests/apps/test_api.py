"""`polymodal.load`: a checkpoint of a short run, used from Python without config files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import polymodal
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.evaluate import captioning, probe, zeroshot_retrieval
from polymodal.evaluation.captioning import caption_scores
from polymodal.tasks.pretrain import build_module
from polymodal.utils.cli import CONFIG_DIR
from polymodal.utils.errors import ConfigError
from tests.helpers import read_wandb_run, tar_members, train_tiny, val_samples, write_tar


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir):
    """(last.ckpt, composed config) of a 2-step CLIP run."""
    return train_tiny(tmp_path_factory.mktemp("run"), shapes_dir)


def test_load_reproduces_the_training_modules_embeddings(trained, shapes_dir):
    checkpoint, cfg = trained
    model = polymodal.load(checkpoint)
    images, texts = val_samples(shapes_dir)

    # the module as training built it, with the weights of the same checkpoint
    module = build_module(cfg).eval()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    tokenizer = TextTokenizer(cfg.data.tokenizer, cfg.data.context_length)
    transform = image_transform(cfg.data.image_size, train=False)
    with torch.no_grad():
        expected_images = module.model.embed("image", torch.stack([transform(i) for i in images]))
        expected_texts = module.model.embed("text", *tokenizer.encode(texts))

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


@pytest.fixture(scope="module")
def captioner(tmp_path_factory, shapes_dir):
    """last.ckpt of a 1-step run of a model with a caption decoder."""
    out = tmp_path_factory.mktemp("captioner")
    return train_tiny(out, shapes_dir, "experiment=captioner", "data.batch_size=8", steps=1)[0]


def test_generate_captions_with_a_decoder_checkpoint(captioner, shapes_dir):
    model = polymodal.load(captioner)
    images, _ = val_samples(shapes_dir, 3)
    captions = model.generate(images, strategy="greedy", max_length=8)
    assert len(captions) == 3 and all(c.strip() for c in captions)  # min_length 1: a word
    # the same captions as the model's own decoder loop, decoded by its tokenizer
    tok = model.tokenizer
    memory = model.module.model.encode("image", model.preprocess(images))
    ids, _ = model.module.model.generate(
        memory, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, max_length=8
    )
    assert ids.shape[1] <= 8 and tok.decode_batch(ids) == captions


def write_coco_style_shard(shapes_dir, out_dir, images: int = 4, captions: int = 3) -> str:
    """A shard laid out as `polymodal-data build` writes COCO: one sample per caption, the
    image repeated, `image_id` in the json. Captions are taken from other val samples."""
    members = tar_members(next((shapes_dir / "val").glob("*.tar")))
    keys = sorted({name.split(".")[0] for name in members})
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, bytes] = {}
    for i, key in enumerate(keys[:images]):
        meta = {**json.loads(members[f"{key}.json"]), "image_id": 100 + i}
        for j in range(captions):
            text = members[f"{keys[images + i * captions + j]}.txt"] if j else members[f"{key}.txt"]
            out[f"img{i}_cap{j}.png"] = members[f"{key}.png"]
            out[f"img{i}_cap{j}.txt"] = text
            out[f"img{i}_cap{j}.json"] = json.dumps(meta).encode()
    return str(write_tar(out_dir / "coco-000000.tar", out))


def test_eval_scores_coco_style_captions_per_image(captioner, shapes_dir, tmp_path):
    """4 images x 3 captions: zero-shot and captioning see 4 images, image->text
    retrieval hits when any of an image's 3 captions is top-ranked."""
    model = polymodal.load(captioner)
    shards = write_coco_style_shard(shapes_dir, tmp_path / "coco")
    spec = {
        "shards": shards,
        "zeroshot": {
            "shape": {"classes": str(shapes_dir / "manifest.json"), "templates": ["a {}"]}
        },
        "media_samples": 2,
    }
    metrics = zeroshot_retrieval(model, spec, 5, tmp_path, "coco")
    assert metrics["samples"] == 12
    confusion = json.loads((tmp_path / "confusion" / "coco_shape.json").read_text())
    assert torch.tensor(confusion["matrix"]).sum() == 4  # each image scored once

    data = model.embed_shards(shards)
    image, text = data["image"][::3], data["text"]  # samples 3i..3i+2 are image i
    best = (image @ text.T).argmax(dim=1) // 3
    assert metrics["retrieval/i2t_r1"] == pytest.approx((best == torch.arange(4)).float().mean())
    csv_rows = (tmp_path / "media" / "retrieval_coco.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 and (tmp_path / "media" / "confusion_shape_coco.png").exists()

    spec = {"shards": shards, "max_samples": 3, "generation": {"max_length": 6}}
    metrics = captioning(model, spec, 2, tmp_path, "coco")
    rows = [json.loads(r) for r in (tmp_path / "captions" / "coco.jsonl").read_text().splitlines()]
    assert metrics["images"] == 3 and [r["key"] for r in rows] == [
        "img0_cap0",
        "img1_cap0",
        "img2_cap0",
    ]
    assert all(len(r["references"]) == 3 for r in rows)
    generated = {r["key"]: r["generated"] for r in rows}
    references = {r["key"]: r["references"] for r in rows}
    assert metrics["bleu4"] == pytest.approx(caption_scores(generated, references)["bleu4"])
    assert 0.0 <= metrics["attribute_match"] <= 1.0


def test_captioning_needs_a_decoder(trained, shapes_dir, tmp_path):
    model = polymodal.load(trained[0])
    with pytest.raises(ConfigError, match="eval.benchmarks.caps: kind captioning needs"):
        captioning(model, {"shards": str(shapes_dir / "val" / "*.tar")}, 8, tmp_path, "caps")


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
    keys = [json.loads(k) for k in (tmp_path / "emb" / "keys.txt").read_text().splitlines()]
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


def run_eval_app(
    checkpoint: Path, shapes_dir: Path, run_dir: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`polymodal-eval` on `checkpoint` (shapes benchmarks) in a subprocess, into `run_dir`."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "polymodal.evaluate",
            f"ckpt_path={checkpoint}",
            f"paths.shapes_dir={shapes_dir}",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_eval_app_runs_every_shapes_benchmark(trained, shapes_dir, tmp_path):
    checkpoint, _ = trained
    run_dir = tmp_path / "eval"
    out = run_eval_app(checkpoint, shapes_dir, run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    assert metrics["val/samples"] == 128 and metrics["test/samples"] == 64
    assert metrics["val/zeroshot/shape_acc"] <= metrics["val/zeroshot/shape_top5"]
    for way in ("i2t", "t2i"):
        r1, r5, r10 = (metrics[f"test/retrieval/{way}_r{k}"] for k in (1, 5, 10))
        assert r1 <= r5 <= r10 and r10 > 0
    # colour is a linear function of even untrained features: far above chance (1/8)
    assert metrics["linear_probe/color_acc"] > 0.5
    confusion = json.loads((run_dir / "confusion" / "val_shape.json").read_text())
    assert len(confusion["classes"]) == len(confusion["matrix"]) == 8
    matrix = torch.tensor(confusion["matrix"])  # rows true, columns predicted
    accuracy = matrix.trace().item() / matrix.sum().item()
    assert accuracy == pytest.approx(metrics["val/zeroshot/shape_acc"])
    assert "evaluation" in out.stdout
    media = run_dir / "media"
    assert {p.name for p in media.glob("*_val.*")} == {
        *(f"confusion_{a}_val.png" for a in ("shape", "color", "size", "position")),
        "retrieval_val.csv",
        "retrieval_val.png",
    }


def test_eval_app_logs_metrics_and_media_to_an_offline_wandb_run(trained, shapes_dir, tmp_path):
    checkpoint, _ = trained
    run_dir = tmp_path / "eval"
    out = run_eval_app(
        checkpoint,
        shapes_dir,
        run_dir,
        "~eval.benchmarks.test",
        "~eval.benchmarks.linear_probe",
        "logger=wandb",
        "logger.wandb.project=evals",
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    logged = read_wandb_run(run_file)
    assert logged["run"].project == "evals" and logged["run"].display_name == "eval"
    assert list(logged["run"].tags) == ["eval"]
    summary = logged["summary"]
    for key in ("val/zeroshot/shape_acc", "val/retrieval/i2t_r1", "val/samples"):
        assert summary[key] == pytest.approx(metrics[key]), key
    assert summary["media/confusion_shape_val/_type"] == "images/separated"
    assert summary["media/retrieval_val/_type"] == "table-file"
    assert summary["media/retrieval_val/nrows"] == 8


def test_shapes_captioning_eval_adds_captions_to_the_shapes_benchmarks():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["eval=shapes_captioning", "ckpt_path=x"])
    assert list(cfg.eval.benchmarks) == ["val", "test", "linear_probe", "captions"]
    assert cfg.eval.benchmarks.captions.kind == "captioning"


def test_linear_probe_takes_its_classes_from_the_train_split(trained, shapes_dir):
    """No class list: the probe's classes are the values of the train split's json."""
    model = polymodal.load(trained[0])
    spec = {
        "train_shards": str(shapes_dir / "val" / "*.tar"),
        "test_shards": str(shapes_dir / "test" / "*.tar"),
        "labels": ["color", "size"],
    }
    metrics = probe(model, spec, 64, shapes_dir, "probe")
    assert sorted(metrics) == ["color_acc", "size_acc"]
    assert all(0 <= value <= 1 for value in metrics.values())


def test_a_checkpoint_of_the_old_backbone_layout_is_refused_in_one_line(trained, tmp_path):
    """Checkpoints written before the model owned its heads cannot be rebuilt: say so."""
    checkpoint = torch.load(trained[0], map_location="cpu", weights_only=True)
    checkpoint["polymodal"]["config"]["model"]["_target_"] = "polymodal.models.backbone.Backbone"
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"old.ckpt: written by polymodal before the model"):
        polymodal.load(tmp_path / "old.ckpt")
