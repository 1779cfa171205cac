"""Text tower: token + position embeddings, pre-norm Transformer, EOS or CLS pooling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.models.transformer import Block, padding_attn_mask


class TextTransformer(nn.Module):
    """CLIP-style text encoder.

    `pool="eos"` takes the last real token (the tokenizer always ends a caption with EOS),
    which is what a causal tower must use; `pool="cls"` takes the first (BOS) token, the
    BERT convention for a bidirectional tower.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 32,
        width: int = 128,
        depth: int = 3,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        causal: bool = True,
        pool: str = "eos",
    ) -> None:
        super().__init__()
        if pool not in ("eos", "cls"):
            raise ValueError(f"model.text.pool must be 'eos' or 'cls', got {pool!r}")
        self.causal = causal
        self.pool_type = pool
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embedding, std=0.01)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embedding", "token_embedding.weight"}

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token features [B, L, width] for ids [B, L] with a boolean mask (True = real)."""
        if ids.shape[1] > self.pos_embedding.shape[0]:
            raise ValueError(
                f"text length {ids.shape[1]} exceeds model.text.context_length "
                f"{self.pos_embedding.shape[0]}"
            )
        x = self.token_embedding(ids) + self.pos_embedding[: ids.shape[1]]
        attn_mask = padding_attn_mask(mask, self.causal)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)

    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.pool_type == "cls":
            return tokens[:, 0]
        last = mask.long().sum(dim=1) - 1
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
