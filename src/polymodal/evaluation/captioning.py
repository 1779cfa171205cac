"""Captioning metrics: COCO BLEU/CIDEr-D and, for the shapes dataset, attribute accuracy.

BLEU and CIDEr come from pycocoevalcap, the reference COCO caption implementations. Its
PTBTokenizer shells out to Java, so captions are tokenized here instead: lowercased and split
on non-alphanumeric characters, which drops punctuation as the PTB tokenizer does. Scores can
therefore differ slightly from official COCO numbers on text with hyphens or apostrophes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jiwer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase and split on non-alphanumerics ("A red-ish circle." -> a, red, ish, circle)."""
    return _WORD.findall(text.lower())


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D for one generated caption per sample id.

    BLEU pools n-gram counts over the corpus (not a mean of sentence scores) and uses the
    closest reference length for the brevity penalty. CIDEr's idf weights come from the
    references of the evaluated set itself, as in COCO, so it is only meaningful over many
    samples: with a single sample every n-gram has idf 0 and CIDEr is 0.
    """
    if predictions.keys() != references.keys():
        missing = sorted(references.keys() - predictions.keys())[:5]
        extra = sorted(predictions.keys() - references.keys())[:5]
        raise ValueError(
            f"predictions and references must have the same ids; missing predictions for "
            f"{missing}, no references for {extra}"
        )
    if not predictions:
        raise ValueError("no samples to score")
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"samples without references: {sorted(empty)[:5]}")

    res = {key: [" ".join(tokenize(caption))] for key, caption in predictions.items()}
    gts = {key: [" ".join(tokenize(ref)) for ref in refs] for key, refs in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["cider"] = float(cider)
    return scores


def attribute_match_rate(
    captions: Sequence[str],
    metas: Sequence[dict],
    attributes: Sequence[str] = ("color", "shape"),
) -> float:
    """Fraction of captions naming the right value of every listed attribute as a whole word.

    Only samples whose meta dict has all `attributes` at the top level count; in the shapes
    dataset those are the single-object images (two-object images keep their attributes in
    `meta["objects"]`). Matching is on tokens, so "reddish" does not count as "red".
    """
    if len(captions) != len(metas):
        raise ValueError(f"got {len(captions)} captions but {len(metas)} metas")
    if not attributes:
        raise ValueError("attributes is empty")
    hits = total = 0
    for caption, meta in zip(captions, metas, strict=True):
        if not all(name in meta for name in attributes):
            continue
        # Padding with spaces makes substring search on joined tokens a whole-word match.
        text = f" {' '.join(tokenize(caption))} "
        total += 1
        hits += all(f" {' '.join(tokenize(str(meta[name])))} " in text for name in attributes)
    if total == 0:
        raise ValueError(f"no sample has all of the attributes {tuple(attributes)}")
    return hits / total


def caption_metrics(
    generated: Mapping[str, str],
    references: Mapping[str, list[str]],
    metas: Mapping[str, Mapping],
    attributes: Sequence[str] = ("color", "shape"),
) -> dict[str, float]:
    """BLEU-1/4 and CIDEr of one generated caption per image against all of that image's
    captions (COCO's rule; training and `polymodal-eval` both score this way), and, when
    images carry every `attributes` field, how often a caption names them all."""
    scores = caption_scores(dict(generated), dict(references))
    metrics = {key: scores[key] for key in ("bleu1", "bleu4", "cider")}
    if attributes and any(all(a in m for a in attributes) for m in metas.values()):
        ids = list(generated)
        metrics["attribute_match"] = attribute_match_rate(
            [generated[i] for i in ids], [metas[i] for i in ids], attributes
        )
    return metrics


def word_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER (jiwer): word substitutions + deletions + insertions over the reference
    words, after the same lower-casing and punctuation split as the caption scores."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError("word_error_rate needs one hypothesis per reference, at least one")
    return float(
        jiwer.wer(
            [" ".join(tokenize(r)) for r in references],
            [" ".join(tokenize(h)) for h in hypotheses],
        )
    )
