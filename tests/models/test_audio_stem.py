"""The AST-style audio stem: patch grid, positions of shorter clips, and audio as one
more modality of the model in every sharing mode."""

from __future__ import annotations

import pytest
import torch

from polymodal.models.audio import AudioStem
from polymodal.models.model import PolymodalModel
from polymodal.objectives.base import EncodingCache
from polymodal.objectives.itc import ITCObjective


def test_patches_cover_the_spectrogram():
    stem = AudioStem(width=8, n_mels=64, seconds=2.0, sample_rate=16000, hop_length=320)
    assert stem.grid == (4, 13) and stem.num_patches == 52  # 100 frames padded to 104
    tokens = stem(torch.randn(2, 1, 64, 100))
    assert tokens.shape == (2, 53, 8)
    # a shorter clip takes the positions of the first columns: its tokens equal those of
    # the same frames inside a full-length clip, except at the zero-padded last column
    full = torch.randn(1, 1, 64, 100)
    short = stem(full[..., :48])  # 6 columns of 8 frames
    grid = stem(full)[:, 1:].view(1, 4, 13, 8)[:, :, :6].flatten(1, 2)
    assert torch.allclose(short[:, 1:], grid, atol=1e-6)
    with pytest.raises(ValueError, match="64 bins x 104 frames"):
        stem(torch.randn(1, 1, 80, 100))


@pytest.mark.parametrize("sharing", ["separate", "multiway", "shared"])
def test_audio_text_contrastive_in_every_sharing_mode(sharing):
    size = {"width": 32, "depth": 1, "num_heads": 2}
    model = PolymodalModel(
        stems={
            "audio": {"_target_": "polymodal.models.audio.AudioStem", "seconds": 0.64},
            "text": {
                "_target_": "polymodal.models.text.TextStem",
                "vocab_size": 50,
                "context_length": 8,
            },
            "image": {"_target_": "polymodal.models.image.ImageStem"},  # not built:
        },
        modalities=["audio", "text"],
        towers={"audio": size, "text": size},
        trunk=size,
        vocab_size=50,
        sharing=sharing,
        parts=("logit_scale",),
    )
    names = dict(model.named_parameters())
    assert model.modalities == ["audio", "text"]
    assert not any("image" in n for n in names)
    if sharing == "multiway":  # an audio expert beside the text one
        assert "encoders.trunk.blocks.0.mlp.audio.0.weight" in names
    gen = torch.Generator().manual_seed(0)
    batch = {
        "audio": torch.randn(4, 1, 64, 32, generator=gen),
        "text_ids": torch.randint(5, 50, (4, 8), generator=gen),
        "text_mask": torch.ones(4, 8, dtype=torch.bool),
    }
    loss = ITCObjective(modalities=("audio", "text"))(EncodingCache(model, batch)).loss
    loss.backward()
    assert model.stem("audio").proj.weight.grad.abs().sum() > 0
    assert model.embed("audio", batch["audio"]).shape == (4, 128)


def test_several_modality_pairs_in_one_step_share_each_encoding(monkeypatch):
    """CLAP's audio-text and an image-audio pair in one step: each modality is encoded
    once (EncodingCache) and every encoder gets gradients."""
    size = {"width": 32, "depth": 1, "num_heads": 2}
    model = PolymodalModel(
        stems={
            "image": {"_target_": "polymodal.models.image.ImageStem", "img_size": 32},
            "audio": {"_target_": "polymodal.models.audio.AudioStem", "seconds": 0.64},
            "text": {
                "_target_": "polymodal.models.text.TextStem",
                "vocab_size": 50,
                "context_length": 8,
            },
        },
        towers={"image": size, "audio": size, "text": size},
        vocab_size=50,
        parts=("logit_scale",),
    )
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda m, *a, **k: calls.append(m) or encode(m, *a, **k))
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(4, 3, 32, 32, generator=gen),
        "audio": torch.randn(4, 1, 64, 32, generator=gen),
        "text_ids": torch.randint(5, 50, (4, 8), generator=gen),
        "text_mask": torch.ones(4, 8, dtype=torch.bool),
    }
    cache = EncodingCache(model, batch)
    pairs = [("audio", "text"), ("image", "text"), ("image", "audio")]
    loss = sum(ITCObjective(modalities=pair)(cache).loss for pair in pairs)
    loss.backward()
    assert sorted(calls) == ["audio", "image", "text"]
    for modality in ("image", "audio", "text"):
        stem = model.stem(modality)
        assert all(p.grad is not None for p in stem.parameters() if p.requires_grad)
