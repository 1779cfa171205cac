"""`init_from`: starting a run from weights (a timm file, a polymodal checkpoint), with
key patterns, and refusing hostile or mismatched files in one line."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from polymodal.utils.checkpoint import init_weights
from polymodal.utils.errors import ConfigError
from tests.helpers import tiny_model, train_tiny

IMAGE = "encoders.image.model."  # where the timm ViT lives in PolymodalModel


def timm_vit(**kwargs) -> torch.nn.Module:
    """The ViT of `tiny_model(conv_stem=False)` as timm builds it, with a 10-class head."""
    shape = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**shape, **kwargs})


def test_timm_file_gives_the_image_tower_timms_features(tmp_path):
    """A random-init timm ViT saved by timm's own state dict: the image tower then
    encodes exactly as timm does; the classifier head is reported unused, the text
    tower is left alone."""
    torch.manual_seed(0)
    vit = timm_vit().eval()
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    model = tiny_model(conv_stem=False).eval()
    text = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoders.text")}
    found = init_weights(model, tmp_path / "vit.safetensors", prefix=IMAGE)
    assert sorted(found["unused"]) == [f"{IMAGE}head.bias", f"{IMAGE}head.weight"]
    assert not found["not_in_file"] and len(found["loaded"]) == len(vit.state_dict()) - 2
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode("image", images), vit.forward_features(images))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in text.items())


def test_timm_file_of_another_image_size_is_resampled_as_timm_does(tmp_path):
    """A ViT saved at 64 px (8 x 8 patches) into the 32 px tower (4 x 4): the position
    embeddings go through timm's own filter, so they are timm's resampling of the file's."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    vit = timm_vit(img_size=64)
    save_file(vit.state_dict(), tmp_path / "vit64.safetensors")
    model = tiny_model(conv_stem=False)
    init_weights(model, tmp_path / "vit64.safetensors", prefix=IMAGE)
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.encoders["image"].model.pos_embed.detach(), expected)
    torch.testing.assert_close(
        model.encoders["image"].model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight
    )


class Payload:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this would run `touch marker`
        return os.system, (f"touch {self.marker}",)


def test_bad_weights_files_are_refused_in_one_line(tmp_path):
    model = tiny_model(conv_stem=False)
    torch.save({"pos_embed": Payload(tmp_path / "marker")}, tmp_path / "code.pt")
    with pytest.raises(ConfigError, match="code.pt: refused: the file needs code to load"):
        init_weights(model, tmp_path / "code.pt")
    assert not (tmp_path / "marker").exists()
    save_file(timm_vit(embed_dim=64).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(
        ConfigError,
        match=r"wide.safetensors: encoders\.image\.model\.\S+ has shape \(.*64.*\), the model's is",
    ):
        init_weights(model, tmp_path / "wide.safetensors", prefix=IMAGE)
    with pytest.raises(
        ConfigError,
        match=r"no tensor matches the model \(init_keys: prefix '', .* a model key: 'encoders",
    ):
        init_weights(model, tmp_path / "wide.safetensors")  # no prefix
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="junk.safetensors: not a safetensors file"):
        init_weights(model, tmp_path / "junk.safetensors")
    torch.save({"state_dict": [1, 2]}, tmp_path / "state.pt")
    with pytest.raises(
        ConfigError, match=r"state.pt: not a state dict \(its state_dict is a list\)"
    ):
        init_weights(model, tmp_path / "state.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(
        ConfigError, match=r"list.pt: not a state dict \(its 'weights' is no tensor\)"
    ):
        init_weights(model, tmp_path / "list.pt")


def test_lit_from_a_pretrained_image_tower(tmp_path, shapes_dir):
    """From the command line: a second run takes the first run's image tower
    (init_keys.include) and locks it; after training, its image tower is the first run's
    bit for bit, while its text tower trained from a fresh start."""
    first, _ = train_tiny(tmp_path / "first", shapes_dir, "seed=1")
    second, _ = train_tiny(
        tmp_path / "second",
        shapes_dir,
        f"init_from={first}",
        "init_keys.include=[model.encoders.image.*,model.projections.image.*]",
        "model.towers.image.lock=true",
        "model.towers.image.freeze_bn_stats=true",
    )
    source = torch.load(first, map_location="cpu", weights_only=True)["state_dict"]
    result = torch.load(second, map_location="cpu", weights_only=True)["state_dict"]
    image = [k for k in source if k.startswith(("model.encoders.image", "model.projections.image"))]
    # frozen BatchNorm counts no batches: the one key of the source it lacks
    assert {k for k in image if k not in result} == {
        "model.encoders.image.model.patch_embed.proj.1.num_batches_tracked",
        "model.encoders.image.model.patch_embed.proj.4.num_batches_tracked",
        "model.encoders.image.model.patch_embed.proj.7.num_batches_tracked",
    }
    assert all(torch.equal(result[k], source[k]) for k in image if k in result)
    text = [k for k in source if k.startswith("model.encoders.text")]
    assert not any(
        torch.equal(result[k], source[k]) for k in text if result[k].dtype.is_floating_point
    )
