"""Pre-norm Transformer blocks on `scaled_dot_product_attention`.

Kept deliberately small (nanoGPT style): the text tower, and later the fusion encoder and
caption decoder, are stacks of these blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, causal=causal)
        return x + self.mlp(self.norm2(x))


def padding_attn_mask(mask: Tensor, causal: bool) -> Tensor:
    """Boolean SDPA mask [B, 1, L, L] (True = may attend) from a [B, L] token mask.

    Padding keys are hidden; with `causal`, future keys too. Every query keeps at least
    itself so padded rows never produce NaNs.
    """
    length = mask.shape[1]
    allowed = mask[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        tril = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        allowed = allowed & tril
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    return allowed | eye
