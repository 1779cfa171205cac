"""PolymodalModel: one interface per modality in each weight-sharing mode, parts built from
config, and nothing else built."""

from __future__ import annotations

import pytest
import torch

from polymodal.models.model import PolymodalModel
from polymodal.models.trunk import Stem
from polymodal.utils.errors import ConfigError
from tests.helpers import tiny_model

ALL_PARTS = ("logit_scale", "logit_bias", "itm_head", "mlm_head", "mim_decoder", "decoder")


def model(sharing: str, parts=ALL_PARTS, depth: int = 2) -> PolymodalModel:
    torch.manual_seed(0)
    return tiny_model(sharing, parts, depth=depth, context_length=12, vocab_size=40).eval()


def batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 40, (3, 12), generator=gen)
    mask = torch.arange(12)[None] < torch.tensor([[12], [7], [4]])
    return images, ids, mask


@pytest.mark.parametrize("sharing", ["separate", "multiway", "shared"])
def test_surface(sharing):
    m = model(sharing)
    images, ids, mask = batch()
    image_tokens = m.encode("image", images)
    assert image_tokens.shape == (3, 1 + 16, 32)
    emb_i, emb_t = m.embed("image", images), m.embed("text", ids, mask)
    assert emb_i.shape == emb_t.shape == (3, 16)
    torch.testing.assert_close(emb_i.norm(dim=-1), torch.ones(3))
    text_tokens = m.encode("text", ids, mask)
    assert m.fuse(text_tokens, mask, image_tokens).shape == (3, 12, 32)
    assert m.match_logits(text_tokens, mask, image_tokens).shape == (3, 2)
    assert m.masked_token_logits(text_tokens, mask, image_tokens).shape == (3, 12, 40)
    assert m.decode(ids, image_tokens, text_mask=mask).shape == (3, 12, 40)
    keep = torch.arange(4).expand(3, -1)
    assert m.reconstruct(m.encode("image", images, keep=keep), keep).shape == (3, 16, 8 * 8 * 3)
    scale, bias = m.contrastive_scale()
    assert scale.item() == pytest.approx(1 / 0.07) and bias.item() == -10.0
    # the batch's keys come from each modality's stem
    inputs = m.inputs({"image": images, "text_ids": ids, "text_mask": mask}, "text")
    assert inputs[0] is ids and inputs[1] is mask


def test_padding_does_not_change_a_caption_embedding():
    """The text mask is honoured: the same caption padded to two lengths embeds the same."""
    m = model("separate")
    ids = torch.tensor([[1, 7, 8, 9, 2, 0, 0, 0, 0, 0, 0, 0]])
    mask = ids != 0
    longer = ids.clone()
    longer[0, 5:] = 33  # different junk after the caption, still masked out
    torch.testing.assert_close(m.embed("text", ids, mask), m.embed("text", longer, mask))


@pytest.mark.parametrize("sharing", ["separate", "multiway", "shared"])
def test_keeping_every_patch_equals_the_unmasked_encoder(sharing):
    """The MIM path (keep a subset of patches) is the plain encoder when nothing is dropped."""
    m = model(sharing)
    images, _, _ = batch()
    keep_all = torch.arange(16).expand(3, -1)
    torch.testing.assert_close(m.encode("image", images, keep=keep_all), m.encode("image", images))
    assert m.encode("image", images, keep=keep_all[:, :4]).shape == (3, 1 + 4, 32)


def test_sharing_modes_share_what_they_say():
    names = {s: {n for n, _ in model(s).named_parameters()} for s in ("multiway", "shared")}
    assert "encoders.trunk.blocks.0.attn.qkv.weight" in names["multiway"]
    experts = {
        "encoders.trunk.blocks.0.mlp.image.0.weight",
        "encoders.trunk.blocks.0.mlp.text.0.weight",
    }
    assert experts <= names["multiway"]
    assert "encoders.trunk.blocks.0.mlp.0.weight" in names["shared"]
    count = {
        s: sum(p.numel() for p in model(s).parameters()) for s in ("separate", "multiway", "shared")
    }
    assert count["shared"] < count["multiway"] < count["separate"]


def test_parts_are_built_only_when_asked_for():
    m = model("separate", parts=("logit_scale",))
    assert m.parts == ["logit_scale"]
    assert m.fusion is None and m.decoder is None and m.itm_head is None and m.logit_bias is None
    with pytest.raises(ConfigError, match=r"no fusion \(model.parts: \['logit_scale'\]\)"):
        m.fuse(*batch()[1:], torch.zeros(3, 5, 32))
    # a head brings what it needs
    assert model("separate", parts=("itm_head",)).parts == ["fusion", "itm_head"]
    with pytest.raises(ConfigError, match="model.parts: unknown"):
        model("separate", parts=("itm",))


def test_the_logit_scale_is_clamped_after_a_step():
    m = model("separate")
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    m.after_optimizer_step()
    assert m.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        m.logit_scale.fill_(-1.0)
    m.after_optimizer_step()
    assert m.logit_scale.item() == 0.0


class ToyStem(Stem):
    """A made-up modality (a vector of 6 numbers -> 3 tokens): adding one needs only a stem
    class and its config."""

    input_key = "toy"

    def __init__(self, width: int, features: int = 6) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(features // 3, width)

    def forward(self, x, keep=None):
        return self.proj(x.view(x.shape[0], 3, -1))

    def pool(self, tokens, mask):
        return tokens.mean(dim=1)


@pytest.mark.parametrize("sharing", ["separate", "multiway"])
def test_a_new_modality_is_a_stem_and_its_config(sharing):
    from polymodal.objectives.base import EncodingCache
    from polymodal.objectives.itc import ITCObjective

    toy = PolymodalModel(
        stems={"toy": {"_target_": f"{__name__}.ToyStem"}, "text": m_text_stem()},
        towers={
            "toy": {"width": 32, "depth": 1, "num_heads": 2},
            "text": {"width": 32, "depth": 1, "num_heads": 2},
        },
        trunk={"width": 32, "depth": 1, "num_heads": 2},
        vocab_size=50,
        sharing=sharing,
        parts=("logit_scale",),
    )
    if sharing == "multiway":
        assert "encoders.trunk.blocks.0.mlp.toy.0.weight" in dict(toy.named_parameters())
    gen = torch.Generator().manual_seed(0)
    batch_ = {
        "toy": torch.randn(4, 6, generator=gen),
        "text_ids": torch.randint(5, 50, (4, 8), generator=gen),
        "text_mask": torch.ones(4, 8, dtype=torch.bool),
    }
    loss = ITCObjective(modalities=("toy", "text"))(EncodingCache(toy, batch_)).loss
    loss.backward()
    assert toy.stem("toy").proj.weight.grad.abs().sum() > 0
    assert toy.modalities == ["toy", "text"]


def m_text_stem() -> dict:
    return {"_target_": "polymodal.models.text.TextStem", "vocab_size": 50, "context_length": 8}


def test_a_stem_target_must_be_a_stem():
    with pytest.raises(ConfigError, match=r"model.stems.text._target_: 'collections.OrderedDict'"):
        PolymodalModel(
            stems={"text": {"_target_": "collections.OrderedDict"}},
            towers={"text": {"width": 8}},
            vocab_size=10,
        )


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
        m = model(sharing, parts=("fusion", "decoder")).train()
        m.set_grad_checkpointing(checkpointing)
        assert m.decoder.grad_checkpointing is checkpointing
        tokens = m.encode("image", images)
        text = m.encode("text", ids, mask)
        loss = (
            m.embed("image", images).sum()
            + m.fuse(text, mask, tokens).pow(2).mean()
            + m.decode(ids, tokens, text_mask=mask).logsumexp(-1).mean()
            + m.encode("image", images, keep=keep).pow(2).mean()
        )
        loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    plain = gradients(False)
    assert not checkpointed_calls
    checkpointed = gradients(True)
    assert {"Block", "DecoderBlock"} <= set(checkpointed_calls)  # text/trunk, fusion+decoder
    if sharing == "separate":
        assert "function" in checkpointed_calls  # timm's checkpoint_seq over the ViT blocks
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("overrides", "scale", "bias"),
    [
        (["task=clip"], 1 / 0.07, None),
        (["task=siglip"], 10.0, -10.0),
        (["task=siglip", "model.logit_scale.init=5", "model.logit_bias.init=-3"], 5.0, -3.0),
    ],
)
def test_part_settings_left_null_come_from_the_objective(overrides, scale, bias, tmp_path):
    from polymodal.tasks.pretrain import build_module
    from tests.helpers import compose_train

    cfg = compose_train(overrides, tmp_path, tmp_path)
    module = build_module(cfg)
    assert module.model.logit_scale.exp().item() == pytest.approx(scale)
    assert (module.model.logit_bias is None) == (bias is None)
    if bias is not None:
        assert module.model.logit_bias.item() == pytest.approx(bias)
    assert cfg.model.logit_scale.init == pytest.approx(scale)  # recorded for polymodal.load


def test_a_timm_tower_key_that_belongs_to_the_stem_is_one_line():
    with pytest.raises(ConfigError, match=r"model.towers.image: \['patch_size'\] belong in"):
        PolymodalModel(
            stems={"image": {"_target_": "polymodal.models.image.ImageStem", "patch_size": 8}},
            towers={"image": {"timm": "vit_tiny_patch16_224", "patch_size": 16}},
            vocab_size=10,
        )
