"""Masked image modeling, MAE style (He et al. 2021; FLAVA's MIM uses the same idea).

A random 75% of patches is dropped; the image encoder sees only the visible ones (plus
CLS); a light Transformer decoder fills the masked positions with a learned mask token and
regresses each masked patch's pixels, normalised per patch. The loss is the MSE over the
masked patches only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.models.backbone import Backbone
from polymodal.models.transformer import Block
from polymodal.objectives.base import EncodingCache, Objective, ObjectiveOutput


def patchify(images: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C], patches in row-major order (as the encoder)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_keep(batch: int, num_patches: int, mask_ratio: float, device=None):
    """Per-sample random subset of patches to keep: (keep [B, K] sorted, masked [B, N])."""
    num_keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    order = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    keep = order[:, :num_keep].sort(dim=1).values
    masked = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, keep, False)
    return keep, masked


def masked_patch_loss(pred: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Mean over masked patches of the per-patch mean squared error."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * masked).sum() / masked.sum()


class MIMObjective(Objective):
    def __init__(
        self,
        backbone: Backbone,
        mask_ratio: float = 0.75,
        decoder_width: int = 64,
        decoder_depth: int = 1,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if backbone.patch_size is None:
            raise ValueError("task.objectives.mim needs a ViT image tower with patches")
        self.patch = backbone.patch_size
        self.num_patches = backbone.num_patches
        self.num_prefix = backbone.num_prefix_tokens
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.embed = nn.Linear(backbone.image_width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.pos = nn.Parameter(
            torch.randn(1, self.num_prefix + self.num_patches, decoder_width) * 0.02
        )
        self.blocks = nn.ModuleList(
            Block(decoder_width, decoder_heads) for _ in range(decoder_depth)
        )
        self.norm = nn.LayerNorm(decoder_width)
        self.pred = nn.Linear(decoder_width, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos"}

    def target(self, images: Tensor) -> Tensor:
        target = patchify(images, self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        images = cache.batch["image"]
        batch = images.shape[0]
        keep, masked = random_keep(batch, self.num_patches, self.mask_ratio, images.device)
        tokens = cache.get("image_tokens_mim", lambda: cache.backbone.encode_image(images, keep))
        x = self.embed(tokens)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        full = self.mask_token.expand(batch, self.num_patches, -1).scatter(1, index, visible)
        x = torch.cat([prefix, full], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        pred = self.pred(self.norm(x)[:, self.num_prefix :])
        return ObjectiveOutput(loss=masked_patch_loss(pred, self.target(images), masked))
