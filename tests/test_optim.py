"""Weight-decay grouping and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.models.backbone import Backbone
from polymodal.objectives.itc import ITCObjective
from polymodal.tasks.optim import no_weight_decay_names, warmup_cosine


def tiny_backbone() -> Backbone:
    return Backbone(
        image={
            "name": "vit_tiny_patch16_224",
            "conv_stem": True,
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
        },
        text={"context_length": 8, "width": 32, "depth": 1, "num_heads": 2},
        embed_dim=16,
        vocab_size=50,
    )


def test_no_decay_on_norms_biases_embeddings_and_logit_scale():
    model = torch.nn.ModuleDict({"backbone": tiny_backbone(), "itc": ITCObjective()})
    skip = no_weight_decay_names(model)
    expected_skip = {
        "itc.logit_scale",
        "backbone.encoders.text_tower.embed.token.weight",
        "backbone.encoders.text_tower.embed.position",
        "backbone.encoders.image_tower.model.pos_embed",
        "backbone.encoders.image_tower.model.cls_token",
        "backbone.encoders.text_tower.norm.weight",
        "backbone.encoders.image_tower.model.blocks.0.attn.qkv.bias",
        # BatchNorm in the conv stem
        "backbone.encoders.image_tower.model.patch_embed.proj.1.weight",
    }
    assert expected_skip <= skip
    decayed = {n for n, _ in model.named_parameters()} - skip
    assert "backbone.encoders.image_tower.model.blocks.0.attn.qkv.weight" in decayed
    assert "backbone.text_proj.weight" in decayed
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decayed)


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
