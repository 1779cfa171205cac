"""Weight-decay grouping and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.tasks.optim import no_weight_decay_names, warmup_cosine
from tests.helpers import tiny_model


def test_no_decay_on_norms_biases_embeddings_and_logit_scale():
    model = tiny_model(parts=("logit_scale",))
    skip = no_weight_decay_names(model)
    expected_skip = {
        "logit_scale",
        "encoders.text.stems.text.embed.token.weight",
        "encoders.text.stems.text.embed.position",
        "encoders.image.model.pos_embed",
        "encoders.image.model.cls_token",
        "encoders.text.norms.text.weight",
        "encoders.image.model.blocks.0.attn.qkv.bias",
        # BatchNorm in the conv stem
        "encoders.image.model.patch_embed.proj.1.weight",
    }
    assert expected_skip <= skip
    decayed = {n for n, _ in model.named_parameters()} - skip
    assert "encoders.image.model.blocks.0.attn.qkv.weight" in decayed
    assert "projections.text.weight" in decayed
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decayed)


def test_no_decay_on_the_trunks_image_stem_tokens():
    skip = no_weight_decay_names(tiny_model("multiway"))
    assert {"encoders.trunk.stems.image.cls_token", "encoders.trunk.stems.image.pos"} <= skip
    assert "encoders.trunk.blocks.0.attn.qkv.weight" not in skip


def test_warmup_then_cosine():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    mid = 10 + 50
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
