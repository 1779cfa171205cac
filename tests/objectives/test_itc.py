"""ITC (CLIP) loss against an independent numpy formula: value and analytic gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymodal.objectives.base import EncodingCache
from polymodal.objectives.itc import ITCObjective, clip_loss
from tests.helpers import random_batch, tiny_model


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def reference(img: np.ndarray, txt: np.ndarray, scale: float):
    """Loss and d loss / d(img, txt) written out by hand (float64)."""
    n = img.shape[0]
    logits = scale * img @ txt.T
    loss = -0.5 * (np.trace(_log_softmax(logits)) + np.trace(_log_softmax(logits.T))) / n
    p_rows = np.exp(_log_softmax(logits))
    p_cols = np.exp(_log_softmax(logits.T)).T
    d_logits = 0.5 * ((p_rows - np.eye(n)) + (p_cols - np.eye(n))) / n
    return loss, scale * d_logits @ txt, scale * d_logits.T @ img


def test_clip_loss_value_and_gradient_match_reference():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(9, 16, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(9, 16, generator=gen, dtype=torch.float64), dim=-1)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = 14.3
    loss = clip_loss(img, txt, torch.tensor(scale, dtype=torch.float64))
    loss.backward()
    ref_loss, ref_dimg, ref_dtxt = reference(img.detach().numpy(), txt.detach().numpy(), scale)
    assert abs(loss.item() - ref_loss) < 1e-10
    np.testing.assert_allclose(img.grad.numpy(), ref_dimg, atol=1e-10)
    np.testing.assert_allclose(txt.grad.numpy(), ref_dtxt, atol=1e-10)


def test_identical_uniform_features_give_log_batch():
    """All similarities equal -> every row is uniform -> loss = ln(B) (open_clip sanity check)."""
    feats = F.normalize(torch.ones(32, 8), dim=-1)
    assert clip_loss(feats, feats, torch.tensor(10.0)).item() == pytest.approx(math.log(32))


def test_objective_is_the_clip_loss_of_the_models_embeddings_at_its_scale():
    model = tiny_model(parts=("logit_scale",))
    batch = random_batch(5)
    out = ITCObjective()(EncodingCache(model, batch))
    image = model.embed("image", batch["image"])
    text = model.embed("text", batch["text_ids"], batch["text_mask"])
    expected = clip_loss(image, text, torch.tensor(1 / 0.07))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.logs["logit_scale"].item() == pytest.approx(1 / 0.07)
    out.loss.backward()
    assert model.logit_scale.grad is not None
