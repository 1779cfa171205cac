"""Linear probe against separable and unlearnable data."""

from __future__ import annotations

import torch

from polymodal.evaluation.linear_probe import linear_probe


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 8) * 4
    labels = torch.arange(n) % 3
    return centres[labels] + torch.randn(n, 8, generator=generator), labels


def test_separable_classes_are_learned_on_held_out_data():
    (train_x, train_y), (test_x, test_y) = blobs(300, 0), blobs(150, 1)
    assert linear_probe(train_x, train_y, test_x, test_y)["acc"] > 0.95


def test_random_labels_stay_near_chance_and_unlabelled_samples_are_ignored():
    train_x, _ = blobs(300, 0)
    test_x, _ = blobs(300, 1)
    generator = torch.Generator().manual_seed(2)
    random_train = torch.randint(0, 3, (300,), generator=generator)
    random_test = torch.randint(0, 3, (300,), generator=generator)
    random_test[:10] = -1
    acc = linear_probe(train_x, random_train, test_x, random_test)["acc"]
    assert 0.2 < acc < 0.47
