"""One Transformer trunk for images and text (`model.sharing=multiway|shared`).

`multiway` is VLMo's layout: attention weights are shared by both modalities, each
modality has its own feed-forward expert (and norm). `shared` uses one set of weights for
everything. Either way, each modality keeps its own stem (patch or token embedding) and
final norm.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from polymodal.models.image import ConvStemPatchEmbed, keep_patches
from polymodal.models.transformer import (
    Block,
    TextEmbedding,
    padding_attn_mask,
    pool_text,
    run_block,
)


class SharedTrunk(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        sharing: str,
        width: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        img_size: int = 64,
        patch_size: int = 8,
        conv_stem: bool = True,
        context_length: int = 32,
        causal: bool = True,
        pool: str = "eos",
    ) -> None:
        super().__init__()
        if sharing not in ("multiway", "shared"):
            raise ValueError(f"model.sharing must be multiway or shared here, got {sharing!r}")
        if pool not in ("eos", "cls"):
            raise ValueError(f"model.text.pool must be 'eos' or 'cls', got {pool!r}")
        self.experts = {"image": "image", "text": "text"}
        if sharing == "shared":
            self.experts = {"image": None, "text": None}
        embed_cls = ConvStemPatchEmbed if conv_stem else PatchEmbed
        self.patch_embed = embed_cls(
            img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=width
        )
        self.patch_size = patch_size
        self.num_patches = self.patch_embed.num_patches
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.image_pos = nn.Parameter(torch.randn(1, 1 + self.num_patches, width) * 0.02)
        self.text_embed = TextEmbedding(vocab_size, context_length, width)
        experts = ("image", "text") if sharing == "multiway" else None
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, experts=experts) for _ in range(depth)
        )
        self.norms = nn.ModuleDict({"image": nn.LayerNorm(width), "text": nn.LayerNorm(width)})
        self.width = width
        self.causal, self.pool_type = causal, pool
        self.grad_checkpointing = False

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "image_pos"}

    def encode_image(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.image_pos
        if keep is not None:
            x = keep_patches(x, keep, self.num_prefix_tokens)
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing, x, expert=self.experts["image"])
        return self.norms["image"](x)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.text_embed(ids)
        attn_mask = padding_attn_mask(mask, self.causal)
        for block in self.blocks:
            x = run_block(
                block, self.grad_checkpointing, x, attn_mask=attn_mask, expert=self.experts["text"]
            )
        return self.norms["text"](x)

    def pool_image(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]

    def pool_text(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return pool_text(tokens, mask, self.pool_type)
