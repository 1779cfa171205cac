"""Task heads the model owns: image-text matching, masked-token prediction and the MAE
pixel decoder. Objectives only turn their outputs into losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.models.transformer import Block


class MLMHead(nn.Module):
    """Vocabulary logits from fused text tokens (BERT's transform + projection)."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, vocab_size)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)


class MAEDecoder(nn.Module):
    """MAE's light decoder: visible tokens are projected, masked positions are filled with a
    learned mask token, and every patch's pixels are regressed after a few blocks."""

    def __init__(
        self,
        memory_dim: int,
        num_patches: int,
        num_prefix_tokens: int,
        patch_pixels: int,
        width: int = 64,
        depth: int = 1,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        self.num_patches, self.num_prefix = num_patches, num_prefix_tokens
        self.embed = nn.Linear(memory_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, num_prefix_tokens + num_patches, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos"}

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """Pixels [B, N, patch_pixels] of every patch from the encoder's tokens of the
        prefix + the patches at `keep` [B, K]."""
        x = self.embed(tokens)
        batch = x.shape[0]
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        full = self.mask_token.expand(batch, self.num_patches, -1).scatter(1, index, visible)
        x = torch.cat([prefix, full], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x)[:, self.num_prefix :])
