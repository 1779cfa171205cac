"""Captioning metrics: BLEU against hand-computed values, CIDEr sanity, attribute matching."""

from __future__ import annotations

import math

import pytest

from polymodal.evaluation.captioning import attribute_match_rate, caption_scores, tokenize

REFERENCES = {
    "0": ["a small red circle on the left"],
    "1": ["a large blue square at the top"],
    "2": ["there is a green star near the bottom"],
    "3": ["two shapes: a white heart and a black cross"],
}


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Two shapes: a RED-ish circle.") == [
        "two",
        "shapes",
        "a",
        "red",
        "ish",
        "circle",
    ]


def test_identical_captions_score_perfectly():
    # Case and punctuation differences vanish in tokenization.
    predictions = {key: refs[0].upper() + "." for key, refs in REFERENCES.items()}
    scores = caption_scores(predictions, REFERENCES)
    for n in range(1, 5):
        assert scores[f"bleu{n}"] == pytest.approx(1.0, rel=1e-6)
    # A prediction equal to its only reference has tf-idf cosine 1 for every n and no length
    # penalty, so CIDEr-D reaches its maximum of 10.
    assert scores["cider"] == pytest.approx(10.0, rel=1e-6)


def test_bleu_matches_hand_computation():
    """prediction "a red circle on the left" against two references:

    lengths 7 and 6 -> closest reference length 6 = prediction length, no brevity penalty.
    1-grams 6/6; 2-grams 5/5 ("a red" is in the second reference); 3-grams 3/4 (all but
    "a red circle"); 4-grams 2/3 ("red circle on the", "circle on the left").
    """
    predictions = {"x": "a red circle on the left"}
    references = {"x": ["a small red circle on the left", "a red square at the top"]}
    scores = caption_scores(predictions, references)
    assert scores["bleu1"] == pytest.approx(1.0, rel=1e-6)
    assert scores["bleu2"] == pytest.approx(1.0, rel=1e-6)
    assert scores["bleu3"] == pytest.approx((3 / 4) ** (1 / 3), rel=1e-6)
    assert scores["bleu4"] == pytest.approx((1 / 2) ** (1 / 4), rel=1e-6)


def test_bleu_pools_counts_over_the_corpus():
    """Adding "red circle" vs "a red circle" (2 of 2 unigrams, 1 of 1 bigram, no 3/4-grams).

    Pooled: 1-grams 8/8, 2-grams 6/6, 3-grams 3/4, 4-grams 2/3; prediction length 8 against
    reference length 9 gives a brevity penalty exp(1 - 9/8).
    """
    predictions = {"x": "a red circle on the left", "y": "red circle"}
    references = {
        "x": ["a small red circle on the left", "a red square at the top"],
        "y": ["a red circle"],
    }
    scores = caption_scores(predictions, references)
    penalty = math.exp(1 - 9 / 8)
    assert scores["bleu1"] == pytest.approx(penalty, rel=1e-6)
    assert scores["bleu2"] == pytest.approx(penalty, rel=1e-6)
    assert scores["bleu3"] == pytest.approx(penalty * (3 / 4) ** (1 / 3), rel=1e-6)
    assert scores["bleu4"] == pytest.approx(penalty * (1 / 2) ** (1 / 4), rel=1e-6)


def test_cider_ranks_correct_caption_above_wrong_one():
    correct = {key: refs[0] for key, refs in REFERENCES.items()}
    close = dict(correct, **{"0": "a small red circle at the left"})
    wrong = dict(correct, **{"0": "a large blue square at the top"})
    cider_correct = caption_scores(correct, REFERENCES)["cider"]
    cider_close = caption_scores(close, REFERENCES)["cider"]
    cider_wrong = caption_scores(wrong, REFERENCES)["cider"]
    assert cider_correct > cider_close > cider_wrong


def test_caption_scores_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({"0": "a red circle"}, REFERENCES)
    with pytest.raises(ValueError, match="without references"):
        caption_scores({"0": "a red circle"}, {"0": []})


def test_attribute_match_rate():
    metas = [
        {"shape": "circle", "color": "red", "size": "small", "num_objects": 1},
        {"shape": "square", "color": "blue", "size": "large", "num_objects": 1},
        {"shape": "star", "color": "green", "size": "small", "num_objects": 1},
        {"shape": "heart", "color": "red", "size": "large", "num_objects": 1},
        # Two-object images carry attributes only under "objects" and are skipped.
        {"objects": [{"shape": "circle", "color": "red"}], "num_objects": 2},
    ]
    captions = [
        "A red circle, on the left.",  # both right
        "a blue circle",  # wrong shape
        "a greenish star",  # "greenish" is not the word "green"
        "a large red heart",  # both right
        "a red circle",  # would match, but skipped
    ]
    assert attribute_match_rate(captions, metas) == pytest.approx(2 / 4)
    assert attribute_match_rate(captions, metas, attributes=("color",)) == pytest.approx(3 / 4)
    assert attribute_match_rate(captions, metas, attributes=("size",)) == pytest.approx(1 / 4)


def test_attribute_match_rate_needs_a_sample_with_attributes():
    with pytest.raises(ValueError, match="no sample"):
        attribute_match_rate(["a red circle"], [{"num_objects": 2, "objects": []}])
    with pytest.raises(ValueError, match="captions"):
        attribute_match_rate(["a red circle"], [])
