"""ValidationReport: what training and polymodal-eval report beyond losses, scored by one
rule (generated captions against all of an image's captions)."""

from __future__ import annotations

import pytest
import torch

from polymodal.evaluation.captioning import caption_scores
from polymodal.evaluation.validation import ValidationReport
from polymodal.objectives.base import EncodingCache
from tests.helpers import random_batch, tiny_model

CAPTIONS = ["a red circle", "a circle that is red", "a blue star", "a green square"]
METAS = [
    {"image_id": 1, "color": "red", "shape": "circle"},
    {"image_id": 1, "color": "red", "shape": "circle"},
    {"image_id": 2, "color": "blue", "shape": "star"},
    {"color": "green", "shape": "square"},  # no image id: an image of its own
]


def test_captions_are_scored_against_every_caption_of_their_image():
    model = tiny_model(parts=("decoder",)).eval()
    batch = random_batch(4)
    batch.update(text=CAPTIONS, meta=METAS, key=["k0", "k1", "k2", "k3"])
    seen = {}

    def captioner(memory, **kwargs):
        seen["memory"], seen["kwargs"] = memory.shape, kwargs
        return ["a red circle", "a red circle", "a red star", "a green square"]

    report = ValidationReport(generation={"max_length": 5}, media_samples=2)
    with torch.no_grad():
        report.update(EncodingCache(model, batch), 0, captioner)
    assert seen == {"memory": (4, 1 + 16, 32), "kwargs": {"max_length": 5}}
    assert report.media_images.shape == (2, 3, 32, 32)

    references = report.caption_references()
    assert references == {
        "('group', '1')": ["a red circle", "a circle that is red"],
        "('group', '2')": ["a blue star"],
        "('sample', 'k3')": ["a green square"],
    }
    metrics = report.caption_metrics()
    generated = {"1": "a red circle", "2": "a red star", "3": "a green square"}
    expected = caption_scores(
        generated, {"1": CAPTIONS[:2], "2": [CAPTIONS[2]], "3": [CAPTIONS[3]]}
    )
    assert metrics["caption/bleu4"] == pytest.approx(expected["bleu4"])
    assert metrics["caption/cider"] == pytest.approx(expected["cider"])
    assert metrics["caption/attribute_match"] == pytest.approx(2 / 3)  # the star is blue


def test_no_captions_without_a_decoder_or_after_the_first_batches():
    report = ValidationReport(caption_batches=1)
    batch = random_batch(4)
    batch.update(text=CAPTIONS, meta=METAS, key=["k0", "k1", "k2", "k3"])

    def captioner(memory, **kwargs):
        raise AssertionError("must not be called")

    with torch.no_grad():
        report.update(EncodingCache(tiny_model(parts=("logit_scale",)), batch), 0, captioner)
        report.update(EncodingCache(tiny_model(parts=("decoder",)), batch), 1, captioner)
    assert report.captions == []
