"""Image tower: any timm model, optionally with a convolutional patch stem.

A plain ViT patch embedding learns shapes slowly on small images; a stack of stride-2
3x3 convolutions in its place ("Early Convolutions Help Transformers See Better",
Xiao et al. 2021) learns them several times faster at nearly the same cost.
"""

from __future__ import annotations

import math

import timm
import torch
from timm.layers import PatchEmbed
from timm.models import checkpoint_seq
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


def keep_patches(tokens: Tensor, keep: Tensor, num_prefix: int) -> Tensor:
    """Prefix tokens (CLS, ...) plus the patch tokens at indices `keep` [B, K] (MAE masking)."""
    patches = tokens[:, num_prefix:]
    index = keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([tokens[:, :num_prefix], patches.gather(1, index)], dim=1)


class TimmImageTower(nn.Module):
    """A timm model as the image tower of `sharing=separate`.

    `encode(images, keep)` drops masked patches before the blocks, which needs the timm
    VisionTransformer layout (patch_embed, _pos_embed, blocks, norm); any other timm model
    works for everything but MIM.
    """

    def __init__(self, name: str, conv_stem: bool = False, **kwargs) -> None:
        super().__init__()
        self.model = create_image_tower(name, conv_stem=conv_stem, **kwargs)
        self.width = self.model.num_features
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        embed = getattr(self.model, "patch_embed", None)
        self.patch_size = embed.patch_size[0] if embed is not None else None
        self.num_patches = embed.num_patches if embed is not None else None

    def encode(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        if keep is None:
            return self.model.forward_features(images)
        if self.patch_size is None or not hasattr(self.model, "blocks"):
            raise ValueError("patch masking (MIM) needs a ViT image tower (model.image.name)")
        m = self.model
        x = m._pos_embed(m.patch_embed(images))
        x = m.norm_pre(keep_patches(x, keep, self.num_prefix_tokens))
        if getattr(m, "grad_checkpointing", False) and torch.is_grad_enabled():
            return m.norm(checkpoint_seq(m.blocks, x))
        return m.norm(m.blocks(x))

    def pool(self, tokens: Tensor) -> Tensor:
        return self.model.forward_head(tokens, pre_logits=True)
