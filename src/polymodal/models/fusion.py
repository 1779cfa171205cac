"""Fusion encoder (ALBEF/BLIP): text tokens attend to each other bidirectionally and
cross-attend to image tokens. The [CLS]/BOS output feeds ITM; every position feeds MLM."""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.models.decoder import DecoderBlock
from polymodal.models.transformer import padding_attn_mask, run_block


class FusionEncoder(nn.Module):
    """Decoder blocks run with a bidirectional padding mask instead of the causal one."""

    def __init__(
        self,
        width: int,
        memory_dim: int,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            DecoderBlock(width, num_heads, mlp_ratio, memory_dim) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.grad_checkpointing = False

    def forward(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        attn_mask = padding_attn_mask(text_mask, causal=False)
        x = text_tokens
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing, x, image_tokens, attn_mask=attn_mask)
        return self.norm(x)
