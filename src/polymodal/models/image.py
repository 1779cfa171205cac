"""Image encoders: the ViT stem of our trunk, or any timm model as a separate tower;
either with an optional convolutional patch stem.

A plain ViT patch embedding learns shapes slowly on small images; a stack of stride-2
3x3 convolutions in its place ("Early Convolutions Help Transformers See Better",
Xiao et al. 2021) learns them several times faster at nearly the same cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import timm
import torch
from timm.layers import PatchEmbed
from timm.models import checkpoint_seq, group_parameters
from torch import Tensor, nn

from polymodal.models.trunk import Stem
from polymodal.utils.errors import ConfigError


class ConvStemPatchEmbed(PatchEmbed):
    """timm PatchEmbed whose projection is log2(patch) conv-BN-ReLU stride-2 layers + 1x1."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        patch, embed_dim = self.patch_size[0], self.proj.out_channels
        num_down = int(math.log2(patch))
        if 2**num_down != patch or self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"conv stem needs a square power-of-two patch size, got {patch}")
        layers: list[nn.Module] = []
        in_ch = self.proj.in_channels
        for i in range(num_down):
            out_ch = max(embed_dim // 2 ** (num_down - 1 - i), 16)
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        layers.append(nn.Conv2d(in_ch, embed_dim, 1))
        self.proj = nn.Sequential(*layers)


def create_image_tower(name: str, conv_stem: bool = False, **kwargs) -> nn.Module:
    """A randomly initialised timm model without a classifier head.

    `kwargs` go to `timm.create_model` (img_size, patch_size, embed_dim, depth, ...).
    No pretrained weights: nothing is downloaded at run time.
    """
    if name not in timm.list_models():
        raise ValueError(f"model.towers.image.timm: unknown timm model {name!r}")
    if conv_stem:
        kwargs["embed_layer"] = ConvStemPatchEmbed
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def keep_patches(tokens: Tensor, keep: Tensor, num_prefix: int) -> Tensor:
    """Prefix tokens (CLS, ...) plus the patch tokens at indices `keep` [B, K] (MAE masking)."""
    patches = tokens[:, num_prefix:]
    index = keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([tokens[:, :num_prefix], patches.gather(1, index)], dim=1)


class ImageStem(Stem):
    """ViT stem: patch embedding (plain or convolutional), a CLS token, learned positions;
    pooled by the CLS token."""

    input_key = "image"
    num_prefix_tokens = 1

    def __init__(
        self, width: int, img_size: int = 64, patch_size: int = 8, conv_stem: bool = True
    ) -> None:
        super().__init__()
        embed_cls = ConvStemPatchEmbed if conv_stem else PatchEmbed
        self.patch_embed = embed_cls(
            img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=width
        )
        self.patch_size = patch_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.num_patches, width) * 0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos"}

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return x if keep is None else keep_patches(x, keep, self.num_prefix_tokens)

    def pool(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return tokens[:, 0]

    @classmethod
    def tower(cls, name: str, stem: Mapping, tower: Mapping) -> nn.Module:
        """A timm model when `tower.timm` names one (its other keys go to timm), else a
        trunk of our blocks."""
        tower = dict(tower)
        if "timm" not in tower:
            return super().tower(name, stem, tower)
        both = sorted(set(stem) & set(tower))
        if both:
            raise ConfigError(f"model.towers.{name}: {both} belong in model.stems.{name}")
        return TimmImageTower(tower.pop("timm"), **stem, **tower)


class TimmImageTower(nn.Module):
    """A timm model as the image encoder of `sharing=separate`, with the trunk interface.

    Needs a timm model whose `forward_features` returns tokens [B, L, width] (ViT, DeiT,
    EVA, ...): fusion and the decoder attend to them. `encode(..., keep=)` drops masked
    patches before the blocks, which needs the VisionTransformer layout (patch_embed,
    _pos_embed, blocks, norm).
    """

    def __init__(self, name: str, conv_stem: bool = False, **kwargs) -> None:
        super().__init__()
        self.model = create_image_tower(name, conv_stem=conv_stem, **kwargs)
        self.width = self.model.num_features
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        embed = getattr(self.model, "patch_embed", None)
        self.patch_size = embed.patch_size[0] if embed is not None else None
        self.num_patches = embed.num_patches if embed is not None else None

    def stem(self, modality: str) -> nn.Module:
        return self  # patch_size, num_patches, num_prefix_tokens

    def encode(
        self, modality: str, images: Tensor, mask: Tensor | None = None, keep: Tensor | None = None
    ) -> Tensor:
        if keep is None:
            return self.model.forward_features(images)
        if self.patch_size is None or not hasattr(self.model, "blocks"):
            raise ValueError("patch masking (MIM) needs a ViT image tower (tower.timm)")
        m = self.model
        x = m._pos_embed(m.patch_embed(images))
        x = m.norm_pre(keep_patches(x, keep, self.num_prefix_tokens))
        if getattr(m, "grad_checkpointing", False) and torch.is_grad_enabled():
            return m.norm(checkpoint_seq(m.blocks, x))
        return m.norm(m.blocks(x))

    def pool(self, modality: str, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.model.forward_head(tokens, pre_logits=True)

    def layer_groups(self) -> list[list[str]]:
        """Parameter names from input to output in timm's coarse groups (ViT: the patch
        embedding and tokens, then a group per block, the final norm joining the last)."""
        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        return [[f"model.{name}" for name in groups[index]] for index in sorted(groups)]
