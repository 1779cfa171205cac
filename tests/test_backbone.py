"""Backbone surface in each weight-sharing mode."""

from __future__ import annotations

import pytest
import torch

from polymodal.models.backbone import Backbone

IMAGE = {
    "name": "vit_tiny_patch16_224",
    "conv_stem": True,
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}
TEXT = {"context_length": 12, "width": 32, "depth": 2, "num_heads": 2}
TRUNK = {"width": 32, "depth": 2, "num_heads": 2}


def backbone(sharing: str) -> Backbone:
    torch.manual_seed(0)
    model = Backbone(
        IMAGE,
        TEXT,
        embed_dim=16,
        vocab_size=40,
        sharing=sharing,
        trunk=TRUNK,
        fusion={"depth": 1, "num_heads": 2},
        decoder={"width": 32, "depth": 1, "num_heads": 2},
    )
    return model.eval()


def batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 40, (3, 12), generator=gen)
    mask = torch.arange(12)[None] < torch.tensor([[12], [7], [4]])
    return images, ids, mask


@pytest.mark.parametrize("sharing", ["separate", "multiway", "shared"])
def test_surface(sharing):
    model = backbone(sharing)
    images, ids, mask = batch()
    image_tokens = model.encode_image(images)
    assert image_tokens.shape == (3, 1 + 16, 32)
    emb_i, emb_t = model.embed_image(images), model.embed_text(ids, mask)
    assert emb_i.shape == emb_t.shape == (3, 16)
    assert torch.allclose(emb_i.norm(dim=-1), torch.ones(3))
    model.require("fusion")
    model.require("decoder")
    fused = model.fuse(model.encode_text(ids, mask), mask, image_tokens)
    assert fused.shape == (3, 12, 32)
    assert model.decode(ids, image_tokens, text_mask=mask).shape == (3, 12, 40)


@pytest.mark.parametrize("sharing", ["separate", "multiway", "shared"])
def test_keeping_every_patch_equals_the_unmasked_encoder(sharing):
    """The MIM path (keep a subset of patches) is the plain encoder when nothing is dropped."""
    model = backbone(sharing)
    images, _, _ = batch()
    keep_all = torch.arange(16).expand(3, -1)
    torch.testing.assert_close(model.encode_image(images, keep_all), model.encode_image(images))
    assert model.encode_image(images, keep_all[:, :4]).shape == (3, 1 + 4, 32)


def test_sharing_modes_share_what_they_say():
    names = {s: {n for n, _ in backbone(s).named_parameters()} for s in ("multiway", "shared")}
    assert "encoders.blocks.0.attn.qkv.weight" in names["multiway"]
    assert {"encoders.blocks.0.mlp.image.0.weight", "encoders.blocks.0.mlp.text.0.weight"} <= names[
        "multiway"
    ]
    assert "encoders.blocks.0.mlp.0.weight" in names["shared"]
    count = {
        s: sum(p.numel() for p in backbone(s).parameters())
        for s in ("separate", "multiway", "shared")
    }
    assert count["shared"] < count["multiway"] < count["separate"]


def test_components_are_built_only_when_required():
    model = backbone("separate")
    assert model.fusion is None and model.decoder is None
    with pytest.raises(RuntimeError, match="require"):
        model.fuse(*batch()[1:], torch.zeros(3, 5, 32))


@pytest.mark.parametrize("sharing", ["separate", "multiway", "shared"])
def test_grad_checkpointing_gives_the_same_gradients(sharing, monkeypatch):
    """Every block stack (image, text, trunk, fusion, decoder, MIM's masked path) recomputes
    in backward without changing a single gradient."""
    images, ids, mask = batch()
    keep = torch.arange(8).repeat(3, 1)
    checkpointed_calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        checkpointed_calls.append(type(function).__name__)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = backbone(sharing).train()
        model.require("fusion")
        model.set_grad_checkpointing(checkpointing)
        model.require("decoder")  # built after the switch: must follow it
        assert model.decoder.grad_checkpointing is checkpointing
        tokens = model.encode_image(images)
        text = model.encode_text(ids, mask)
        loss = (
            model.embed_image(images).sum()
            + model.fuse(text, mask, tokens).pow(2).mean()
            + model.decode(ids, tokens, text_mask=mask).logsumexp(-1).mean()
            + model.encode_image(images, keep).pow(2).mean()
        )
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients(False)
    assert not checkpointed_calls
    checkpointed = gradients(True)
    assert {"Block", "DecoderBlock"} <= set(checkpointed_calls)  # text/trunk, fusion+decoder
    if sharing == "separate":
        assert "function" in checkpointed_calls  # timm's checkpoint_seq over the ViT blocks
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
