"""Zero-shot classification with a text-derived classifier (CLIP prompt ensembling), and
the zero-shot spec: per attribute, where its class names come from and its prompts."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.utils.errors import ConfigError

# prompts of an attribute whose spec names no `templates` (CLIP-style, generic)
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
VALUES = "values"  # `classes: values`: the sorted distinct values in the samples' json
SPEC_KEYS = ("classes", "templates", "phrases")


@dataclass
class ZeroShotTask:
    """One attribute's zero-shot classification: class names in label order, prompt
    templates (`{}` is the class's phrase) and phrases (class name -> words, or a list of
    wordings whose prompts are all averaged; default the name itself)."""

    classes: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    phrases: dict[str, str | list[str]] = field(default_factory=dict)


def read_classes(
    source: object, where: str, attribute: str, values: Callable[[str], list[str]]
) -> list[str]:
    """Class names from `source`: a list, `values` (`values(attribute)`), a text file (one
    name per line) or a json file (a list, or a manifest whose `attributes.<attribute>` is
    the list). `where` names the config field in errors."""
    if isinstance(source, Sequence) and not isinstance(source, str):
        names = [str(name) for name in source]
    elif source == VALUES:
        names = values(attribute)
        if not names:
            raise ConfigError(f"{where}: no evaluated sample's json has a {attribute!r} field")
    elif isinstance(source, str) and source.endswith((".txt", ".json")):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{where}: no such file {source!r}")
        if path.suffix == ".txt":
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            names = json.loads(path.read_text())
            if isinstance(names, dict):
                vocab = names.get("attributes", {})
                if attribute not in vocab:
                    raise ConfigError(
                        f"{where}: {source} has no attributes.{attribute} (has {sorted(vocab)})"
                    )
                names = vocab[attribute]
            if not isinstance(names, list):
                raise ConfigError(f"{where}: {source} holds neither a list nor a manifest")
            names = [str(name) for name in names]
    else:
        raise ConfigError(
            f"{where}: expected a list of class names, a .txt or .json file, or '{VALUES}', "
            f"got {source!r}"
        )
    if not names:
        raise ConfigError(f"{where}: no class names in {source!r}")
    return names


def read_phrases(source: object, where: str, attribute: str) -> dict:
    """Phrases from `source`: a mapping (class name -> words or wordings), or a json
    manifest whose `phrases.<attribute>` is one (a generated dataset's, written with the
    captions' grammar). `where` names the config field in errors."""
    if not isinstance(source, str):
        return dict(source or {})
    path = Path(source)
    if path.suffix != ".json" or not path.is_file():
        raise ConfigError(f"{where}: expected class -> words, or a json manifest; got {source!r}")
    phrases = json.loads(path.read_text())
    phrases = phrases.get("phrases", {}) if isinstance(phrases, dict) else {}
    if not isinstance(phrases.get(attribute), dict):
        raise ConfigError(f"{where}: {source} has no phrases.{attribute}")
    return phrases[attribute]


def zeroshot_tasks(
    spec: Mapping | None, where: str, values: Callable[[str], list[str]]
) -> dict[str, ZeroShotTask]:
    """A zero-shot spec (`{attribute: {classes, templates?, phrases?}}`, `where` its config
    field) resolved to tasks. `values(attribute)` gives the sorted distinct values of the
    attribute in the evaluated samples' json, for `classes: values`."""
    tasks = {}
    for attribute, entry in (spec or {}).items():
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"{where}.{attribute}: expected {{classes: ..., templates: [...]}}, got {entry!r}"
            )
        unknown = sorted(set(entry) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{attribute}: unknown key {unknown[0]!r} (has {SPEC_KEYS})")
        if entry.get("classes") is None:
            raise ConfigError(
                f"{where}.{attribute}.classes: missing; a list of class names, a .txt or "
                f".json file, or '{VALUES}'"
            )
        classes = read_classes(entry["classes"], f"{where}.{attribute}.classes", attribute, values)
        templates = list(entry.get("templates") or DEFAULT_TEMPLATES)
        if any("{}" not in template for template in templates):
            raise ConfigError(
                f"{where}.{attribute}.templates: each needs '{{}}' for the class, got {templates}"
            )
        phrases = read_phrases(entry.get("phrases"), f"{where}.{attribute}.phrases", attribute)
        for name, words in phrases.items():
            wordings = [words] if isinstance(words, str) else words
            if not wordings or not all(isinstance(w, str) and w for w in wordings):
                raise ConfigError(
                    f"{where}.{attribute}.phrases.{name}: words or a list of wordings, got "
                    f"{words!r}"
                )
        tasks[attribute] = ZeroShotTask(classes, templates, phrases)
    return tasks


@torch.no_grad()
def build_zeroshot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str | Sequence[str]],
    templates: Sequence[str],
) -> Tensor:
    """Return a [C, D] float32 classifier: one L2-normalised text embedding per class.

    Each class embedding is the mean of its normalised prompt embeddings (one prompt per
    template and wording: a class given as a list of wordings, e.g. "two beeps", "two
    chimes", is the ensemble over all of them), normalised again. Averaging directions
    rather than raw embeddings keeps one high-norm prompt from dominating the ensemble
    (CLIP's recipe). `encode_text` is called once per class with all of its prompts.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")

    weights = []
    for name in class_names:
        wordings = [name] if isinstance(name, str) else list(name)
        prompts = [template.format(w) for w in wordings for template in templates]
        prompt_emb = F.normalize(encode_text(prompts).float(), dim=-1)
        weights.append(F.normalize(prompt_emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


def _labeled_logits(image_emb: Tensor, classifier: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Drop unlabeled samples (label < 0, e.g. missing attribute) and score the rest."""
    if image_emb.ndim != 2 or classifier.ndim != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"expected image_emb [N, D] and classifier [C, D], got {tuple(image_emb.shape)} "
            f"and {tuple(classifier.shape)}"
        )
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(
            f"labels must have shape ({image_emb.shape[0]},), got {tuple(labels.shape)}"
        )
    labels = labels.to(device=image_emb.device, dtype=torch.long)
    keep = labels >= 0
    if not keep.any():
        raise ValueError("no labeled samples: every label is < 0")
    labels = labels[keep]
    num_classes = classifier.shape[0]
    if labels.max() >= num_classes:
        raise ValueError(f"label {labels.max().item()} out of range for {num_classes} classes")
    logits = image_emb[keep].float() @ classifier.to(image_emb.device, torch.float32).T
    return logits, labels


def _confusion(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    flat = labels * num_classes + pred
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


@torch.no_grad()
def confusion_matrix(image_emb: Tensor, classifier: Tensor, labels: Tensor) -> Tensor:
    """[C, C] counts of top-1 predictions; rows are true classes, columns predicted ones.

    Samples with label < 0 are ignored.
    """
    logits, labels = _labeled_logits(image_emb, classifier, labels)
    return _confusion(logits.argmax(dim=1), labels, classifier.shape[0])


@torch.no_grad()
def zeroshot_metrics(
    image_emb: Tensor,
    classifier: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """`classification_metrics` of the zero-shot logits `image_emb @ classifier.T`.
    Samples with label < 0 are ignored."""
    logits, labels = _labeled_logits(image_emb, classifier, labels)
    return classification_metrics(logits, labels, ks)


@torch.no_grad()
def classification_metrics(
    logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-1 `acc`, `top{k}` for each k in ks with 1 < k <= C, and `mean_per_class_acc` of
    class `logits` [N, C] against `labels` [N] (all in range).

    `mean_per_class_acc` averages recall over the classes that occur in the labels, so it
    is not skewed by class imbalance (or absent classes). Values are python floats in [0, 1].
    """
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1)
    metrics = {"acc": (pred == labels).double().mean().item()}
    topk = [k for k in ks if 1 < k <= num_classes]
    if topk:
        ranked = logits.topk(max(topk), dim=1).indices
        correct = ranked == labels[:, None]
        for k in topk:
            metrics[f"top{k}"] = correct[:, :k].any(dim=1).double().mean().item()
    confusion = _confusion(pred, labels, num_classes)
    per_class_total = confusion.sum(dim=1)
    present = per_class_total > 0
    recall = confusion.diagonal()[present].double() / per_class_total[present]
    metrics["mean_per_class_acc"] = recall.mean().item()
    return metrics
