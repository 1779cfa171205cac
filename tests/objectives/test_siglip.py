"""SigLIP loss against an independent numpy formula: value and analytic gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymodal.objectives.base import EncodingCache
from polymodal.objectives.siglip import SigLIPObjective, siglip_loss
from tests.helpers import random_batch, tiny_model


def reference(img: np.ndarray, txt: np.ndarray, scale: float, bias: float):
    """Loss and d loss / d(img, txt, scale, bias) written out by hand (float64).

    With x_ij = s <f_i, g_j> + b and z = 2I - 1, L = (1/B) sum_ij softplus(-z_ij x_ij), so
    dL/dx_ij = -(z_ij / B) sigmoid(-z_ij x_ij); the chain rule through x gives the rest.
    """
    n = img.shape[0]
    sims = img @ txt.T
    x = scale * sims + bias
    z = 2 * np.eye(n) - 1
    loss = np.logaddexp(0.0, -z * x).sum() / n
    d_x = -(z / n) / (1.0 + np.exp(z * x))
    return loss, scale * d_x @ txt, scale * d_x.T @ img, (d_x * sims).sum(), d_x.sum()


def test_siglip_loss_value_and_gradient_match_reference():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 12, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(7, 12, generator=gen, dtype=torch.float64), dim=-1)
    # Correlate the pairs a little so positives and negatives both carry gradient.
    txt = F.normalize(txt + img, dim=-1)
    scale = torch.tensor(8.5, dtype=torch.float64)
    bias = torch.tensor(-3.2, dtype=torch.float64)
    for t in (img, txt, scale, bias):
        t.requires_grad_(True)
    loss = siglip_loss(img, txt, scale, bias)
    loss.backward()
    ref = reference(img.detach().numpy(), txt.detach().numpy(), 8.5, -3.2)
    ref_loss, ref_dimg, ref_dtxt, ref_dscale, ref_dbias = ref
    assert abs(loss.item() - ref_loss) < 1e-10
    np.testing.assert_allclose(img.grad.numpy(), ref_dimg, atol=1e-10)
    np.testing.assert_allclose(txt.grad.numpy(), ref_dtxt, atol=1e-10)
    assert abs(scale.grad.item() - ref_dscale) < 1e-10
    assert abs(bias.grad.item() - ref_dbias) < 1e-10


def test_orthogonal_one_hot_features_give_hand_computed_loss():
    """<f_i, g_j> = delta_ij: B positives at s + b and B(B-1) negatives at b.

    With s = 10, b = -10 each positive logit is 0 (loss ln 2) and each negative costs
    ln(1 + e^-10), so L = ln 2 + (B - 1) ln(1 + e^-10).
    """
    batch = 6
    feats = torch.eye(batch, 10, dtype=torch.float64)
    loss = siglip_loss(feats, feats, torch.tensor(10.0), torch.tensor(-10.0))
    expected = math.log(2) + (batch - 1) * math.log1p(math.exp(-10))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_objective_is_the_siglip_loss_at_the_models_scale_and_bias():
    model = tiny_model(parts=("logit_bias",))  # brings logit_scale
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10))
    batch = random_batch(5)
    out = SigLIPObjective()(EncodingCache(model, batch))
    image = model.embed("image", batch["image"])
    text = model.embed("text", batch["text_ids"], batch["text_mask"])
    expected = siglip_loss(image, text, torch.tensor(10.0), torch.tensor(-10.0))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.logs["logit_scale"].item() == pytest.approx(10.0)
    assert out.logs["logit_bias"].item() == pytest.approx(-10.0)
    out.loss.backward()
    assert model.logit_scale.grad is not None and model.logit_bias.grad is not None


def test_the_bias_is_never_clamped():
    model = tiny_model(parts=("logit_bias",))
    with torch.no_grad():
        model.logit_bias.fill_(-30.0)
    model.after_optimizer_step()
    assert model.logit_bias.item() == pytest.approx(-30.0)
