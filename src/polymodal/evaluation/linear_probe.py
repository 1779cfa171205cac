"""Linear probe: multinomial logistic regression on frozen embeddings (CLIP's protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.utils.errors import ConfigError


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> dict[str, float]:
    """Fit softmax regression (L2-regularised, L-BFGS, full batch, float64) on the train
    split and report top-1 `acc` on the test split. Samples with label < 0 are ignored."""
    keep_train, keep_test = train_y >= 0, test_y >= 0
    x, y = train_x[keep_train].double(), train_y[keep_train].long()
    if len(y) == 0 or keep_test.sum() == 0:
        raise ConfigError("linear probe: no labelled samples in the train or test split")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardise with train statistics
    x = (x - mean) / std
    classes = int(max(y.max(), test_y[keep_test].max())) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        test = (test_x[keep_test].double() - mean) / std
        pred = (test @ weight + bias).argmax(dim=1)
    return {"acc": (pred == test_y[keep_test]).double().mean().item()}
