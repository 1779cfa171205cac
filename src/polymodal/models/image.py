"""Image tower: any timm model, optionally with a convolutional patch stem.

A plain ViT patch embedding learns shapes slowly on small images; a stack of stride-2
3x3 convolutions in its place ("Early Convolutions Help Transformers See Better",
Xiao et al. 2021) learns them several times faster at nearly the same cost.
"""

from __future__ import annotations

import math

import timm
from timm.layers import PatchEmbed
from torch import Tensor, nn


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
        raise ValueError(f"model.image.name: unknown timm model {name!r}")
    if conv_stem:
        kwargs["embed_layer"] = ConvStemPatchEmbed
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def image_features(tower: nn.Module, images: Tensor) -> Tensor:
    """Unpooled features: [B, N, D] tokens for ViTs, [B, C, H, W] maps for convnets."""
    return tower.forward_features(images)


def pool_image(tower: nn.Module, features: Tensor) -> Tensor:
    """The model's own pooling (CLS / mean token / global average) -> [B, D]."""
    return tower.forward_head(features, pre_logits=True)
