"""Text tower: token + position embeddings, pre-norm Transformer, EOS or CLS pooling."""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.models.transformer import (
    Block,
    TextEmbedding,
    padding_attn_mask,
    pool_text,
    run_block,
)


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
        self.grad_checkpointing = False
        self.embed = TextEmbedding(vocab_size, context_length, width)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token features [B, L, width] for ids [B, L] with a boolean mask (True = real)."""
        x = self.embed(ids)
        attn_mask = padding_attn_mask(mask, self.causal)
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing, x, attn_mask=attn_mask)
        return self.norm(x)

    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return pool_text(tokens, mask, self.pool_type)
