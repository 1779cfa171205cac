import pytest
import torch
import torch.nn.functional as F

from polymodal.evaluation.zeroshot import (
    build_zeroshot_classifier,
    confusion_matrix,
    zeroshot_metrics,
)

CLASSES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def fake_encoder(dim: int = 8):
    """Deterministic text encoder: a fixed random vector per prompt, with varying norms."""
    generator = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}
    calls: list[list[str]] = []

    def encode_text(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        for prompt in prompts:
            if prompt not in table:
                table[prompt] = torch.randn(dim, generator=generator) * (1 + len(table))
        return torch.stack([table[p] for p in prompts])

    return encode_text, table, calls


def test_template_ensemble_is_mean_of_normalized_prompts():
    encode_text, table, calls = fake_encoder()
    classifier = build_zeroshot_classifier(encode_text, CLASSES, TEMPLATES)

    assert classifier.shape == (3, 8)
    assert calls[0] == ["a photo of a cat.", "a drawing of a cat."]
    for row, name in zip(classifier, CLASSES, strict=True):
        prompts = [F.normalize(table[t.format(name)], dim=0) for t in TEMPLATES]
        expected = F.normalize(sum(prompts) / len(prompts), dim=0)
        torch.testing.assert_close(row, expected)


def test_classifier_is_built_without_grad():
    weight = torch.randn(8, requires_grad=True)
    classifier = build_zeroshot_classifier(
        lambda prompts: weight.expand(len(prompts), 8) * 2, ["a"], ["{}"]
    )
    assert not classifier.requires_grad


def test_template_without_placeholder_is_rejected():
    encode_text, _, _ = fake_encoder()
    with pytest.raises(ValueError, match="a photo of a thing"):
        build_zeroshot_classifier(encode_text, CLASSES, ["a photo of a {}.", "a photo of a thing"])


def test_oracle_embeddings_are_perfectly_classified():
    encode_text, _, _ = fake_encoder(dim=16)
    names = [f"class{i}" for i in range(6)]
    classifier = build_zeroshot_classifier(encode_text, names, TEMPLATES)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 3, 0])
    torch.manual_seed(0)
    image_emb = F.normalize(classifier[labels] + 1e-3 * torch.randn(len(labels), 16), dim=-1)

    metrics = zeroshot_metrics(image_emb, classifier, labels)
    assert metrics == {"acc": 1.0, "top5": 1.0, "mean_per_class_acc": 1.0}


# Classes are the axes of R^3, so each image's scores are its own coordinates.
CLASSIFIER = torch.eye(3)
IMAGES = torch.tensor(
    [
        [0.9, 0.1, 0.0],  # true 0 -> pred 0
        [0.2, 0.7, 0.1],  # true 0 -> pred 1 (class 0 ranked 2nd)
        [0.1, 0.8, 0.1],  # true 1 -> pred 1
        [0.3, 0.1, 0.6],  # true 1 -> pred 2 (class 1 ranked 3rd)
        [0.1, 0.2, 0.7],  # true 2 -> pred 2
        [0.6, 0.1, 0.3],  # unlabeled, would be a class-0 prediction
    ]
)
LABELS = torch.tensor([0, 0, 1, 1, 2, -1])


def test_confusion_matrix_on_known_fixture():
    confusion = confusion_matrix(IMAGES, CLASSIFIER, LABELS)
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert confusion.dtype == torch.long
    assert torch.equal(confusion, expected)


def test_metrics_on_known_fixture_ignore_unlabeled_and_skip_top5():
    metrics = zeroshot_metrics(IMAGES, CLASSIFIER, LABELS, ks=(1, 2, 5))
    # 3 of 5 labeled correct; top2 adds image 1 (class 0 second); per-class 1/2, 1/2, 1/1.
    assert metrics == pytest.approx({"acc": 3 / 5, "top2": 4 / 5, "mean_per_class_acc": 2 / 3})
    assert "top5" not in metrics


def test_mean_per_class_acc_only_averages_present_classes():
    labels = torch.tensor([0, 0, 0, 1, -1, -1])
    metrics = zeroshot_metrics(IMAGES, CLASSIFIER, labels, ks=(1,))
    # Class 0: images 0, 1, 2 predicted 0, 1, 1 -> 1/3. Class 1: image 3 predicted 2 -> 0.
    # Class 2 has no samples, so it is left out rather than averaged in as 0.
    assert metrics == pytest.approx({"acc": 1 / 4, "mean_per_class_acc": (1 / 3 + 0) / 2})


def test_all_unlabeled_is_rejected():
    with pytest.raises(ValueError, match="no labeled samples"):
        zeroshot_metrics(IMAGES, CLASSIFIER, torch.full((6,), -1))
