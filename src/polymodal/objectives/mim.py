"""Masked image modeling, MAE style (He et al. 2021; FLAVA's MIM uses the same idea).

A random 75% of patches is dropped; the image encoder sees only the visible ones (plus
CLS); a light Transformer decoder fills the masked positions with a learned mask token and
regresses each masked patch's pixels, normalised per patch. The loss is the MSE over the
masked patches only.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    """Loss of the model's MAE decoder (`model.mim_decoder` sizes it) on the image."""

    parts = ("mim_decoder",)

    def __init__(self, mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss

    def target(self, images: Tensor, patch: int) -> Tensor:
        target = patchify(images, patch)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        return ("image",)

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        model = cache.model
        images = cache.batch["image"]
        stem = model.stem("image")
        keep, masked = random_keep(
            images.shape[0], stem.num_patches, self.mask_ratio, images.device
        )
        tokens = cache.get("image_tokens_mim", lambda: model.encode("image", images, keep=keep))
        pred = model.reconstruct(tokens, keep)
        target = self.target(images, stem.patch_size)
        return ObjectiveOutput(loss=masked_patch_loss(pred, target, masked))
