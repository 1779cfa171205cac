"""Classification fine-tuning (task=classify) of a short shapes CLIP run: the head starts as
the zero-shot classifier, what trains and what stays, before/after evaluation, WiSE-FT."""

from __future__ import annotations

import pytest
import torch

import polymodal
from polymodal.convert import main as convert
from polymodal.convert import wise_ft_files
from polymodal.evaluate import classifier, zeroshot_retrieval
from polymodal.tasks.pretrain import ZEROSHOT_CHECKPOINT
from polymodal.train import train
from polymodal.utils.errors import ConfigError
from tests.helpers import train_tiny, val_samples

FINETUNE = [
    "task=classify",
    "task.objectives.classify.attribute=color",  # 8 classes
    "model.classifier.num_classes=8",
    "model.towers.text.lock=true",
    "task.optimizer.lr=1e-3",
    "task.scheduler.warmup_steps=5",
    "task.evaluation.retrieval=false",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shapes_dir):
    return train_tiny(tmp_path_factory.mktemp("clip"), shapes_dir, steps=30)[0]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, shapes_dir, pretrained):
    """(run dir, last.ckpt, config) of 40 fine-tuning steps from `pretrained`."""
    out = tmp_path_factory.mktemp("finetune")
    ckpt, cfg = train_tiny(out, shapes_dir, *FINETUNE, f"init_from={pretrained}", steps=40)
    return out, ckpt, cfg


def test_the_head_starts_as_the_zero_shot_classifier(finetuned, pretrained, shapes_dir):
    out, _, cfg = finetuned
    start = polymodal.load(out / ZEROSHOT_CHECKPOINT)
    spec = cfg.data.zeroshot.color
    classes = start.classifier["classes"]
    assert start.classifier["attribute"] == "color" and len(classes) == 8
    images, _ = val_samples(shapes_dir, 16)
    # polymodal.load's zero-shot path: prompts encoded and ensembled by the API, not training
    expected = start.zero_shot(
        images, [spec.get("phrases", {}).get(c, c) for c in classes], spec.templates
    )
    torch.testing.assert_close(start.classify(images), expected, atol=1e-5, rtol=0)
    # and that of the CLIP checkpoint fine-tuning started from (the same towers)
    clip = polymodal.load(pretrained)
    classes_words = [spec.get("phrases", {}).get(c, c) for c in classes]
    expected = clip.zero_shot(images, classes_words, spec.templates)
    torch.testing.assert_close(start.classify(images), expected, atol=1e-5, rtol=0)


def test_finetuning_trains_the_image_tower_and_head_and_keeps_the_locked_text(
    finetuned, pretrained
):
    out, ckpt, _ = finetuned
    before = torch.load(pretrained, weights_only=True)["state_dict"]
    start = torch.load(out / ZEROSHOT_CHECKPOINT, weights_only=True)["state_dict"]
    after = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in after.items():
        if name.startswith(("model.encoders.text.", "model.projections.text.")):
            assert torch.equal(value, before[name]), name
            assert torch.equal(value, start[name]), name
    for prefix in ("model.encoders.image.", "model.classifier."):
        moved = [n for n in after if n.startswith(prefix) and not torch.equal(after[n], start[n])]
        assert moved, prefix


def test_the_finetuned_head_beats_its_zero_shot_start_on_val(finetuned, shapes_dir, tmp_path):
    out, ckpt, _ = finetuned
    shards = {"shards": str(shapes_dir / "val" / "*.tar")}
    start = polymodal.load(out / ZEROSHOT_CHECKPOINT)
    before = classifier(start, shards, 256, tmp_path, "before")
    zeroshot = zeroshot_retrieval(
        start,
        {
            **shards,
            "zeroshot": {"color": dict(start.config["data"]["zeroshot"]["color"])},
            "retrieval": False,
        },
        256,
        tmp_path,
        "zs",
    )
    # the untrained head is zero-shot classification, scored by another benchmark kind
    assert before["color_acc"] == pytest.approx(zeroshot["zeroshot/color_acc"], abs=1e-9)
    after = classifier(polymodal.load(ckpt), shards, 256, tmp_path, "after")
    assert after["samples"] == before["samples"] > 50
    # 8 colours (chance 0.125): measured 0.14 -> 0.46 on 93 val samples
    assert after["color_acc"] > max(before["color_acc"] + 0.15, 0.3), (before, after)


def test_a_resumed_finetuning_run_keeps_its_trained_head(finetuned, shapes_dir):
    out, ckpt, cfg = finetuned
    head = torch.load(ckpt, weights_only=True)["state_dict"]["model.classifier.weight"]
    start = (out / ZEROSHOT_CHECKPOINT).read_bytes()
    metrics = train(cfg)  # the same run again: resumes its finished last.ckpt
    assert metrics["train/global_step"] == 40
    resumed = polymodal.load(ckpt).module.model.classifier.weight
    torch.testing.assert_close(resumed, head, atol=0, rtol=0)
    assert (out / ZEROSHOT_CHECKPOINT).read_bytes() == start  # the start is not rewritten


def test_wise_ft_mixes_the_two_ends_of_the_run(finetuned, pretrained, tmp_path, capsys):
    out, ckpt, _ = finetuned
    start = torch.load(out / ZEROSHOT_CHECKPOINT, weights_only=True)["state_dict"]
    end = torch.load(ckpt, weights_only=True)["state_dict"]
    for alpha, expected in ((0.0, start), (1.0, end)):
        mixed = torch.load(
            wise_ft_files(out / ZEROSHOT_CHECKPOINT, ckpt, tmp_path / "w.ckpt", alpha),
            weights_only=True,
        )["state_dict"]
        for name, value in end.items():  # counters (BatchNorm's batches) from the end
            wanted = expected[name] if value.is_floating_point() else value
            assert torch.equal(mixed[name], wanted), (alpha, name)
    assert (
        convert(
            [
                "wise-ft",
                str(out / ZEROSHOT_CHECKPOINT),
                str(ckpt),
                str(tmp_path / "h.ckpt"),
                "--alpha",
                "0.25",
            ]
        )
        == 0
    )
    half = polymodal.load(tmp_path / "h.ckpt")  # a checkpoint polymodal-eval opens
    name = "model.classifier.weight"
    torch.testing.assert_close(
        half.module.state_dict()[name], 0.75 * start[name] + 0.25 * end[name], atol=1e-7, rtol=0
    )
    # not two ends of one run; alpha out of range
    assert (
        convert(["wise-ft", str(out / ZEROSHOT_CHECKPOINT), str(pretrained), str(tmp_path / "x")])
        == 1
    )
    assert "different tensors (e.g. model.classifier.bias)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--alpha"):
        wise_ft_files(out / ZEROSHOT_CHECKPOINT, ckpt, tmp_path / "y.ckpt", 1.5)


def test_classify_settings_are_checked_against_the_data(tmp_path, shapes_dir, pretrained):
    with pytest.raises(ConfigError, match=r"num_classes=4, but data.zeroshot.color has 8"):
        train_tiny(tmp_path / "a", shapes_dir, *FINETUNE, "model.classifier.num_classes=4")
    with pytest.raises(ConfigError, match="'weight' has no class list in data.zeroshot"):
        train_tiny(
            tmp_path / "b", shapes_dir, *FINETUNE, "task.objectives.classify.attribute=weight"
        )
    with pytest.raises(ConfigError, match="needs a checkpoint with a classifier head"):
        classifier(polymodal.load(pretrained), {"shards": "x"}, 8, tmp_path, "c")
