"""Pre-norm Transformer blocks on `scaled_dot_product_attention`.

Kept deliberately small (nanoGPT style): the text tower, and later the fusion encoder and
caption decoder, are stacks of these blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


@dataclass
class LayerCache:
    """Keys/values of one attention layer for incremental decoding, each [N, heads, T, head_dim]
    (None until filled); `memory_*` hold a cross-attention's projected memory."""

    keys: Tensor | None = None
    values: Tensor | None = None
    memory_keys: Tensor | None = None
    memory_values: Tensor | None = None


class SelfAttention(nn.Module):
    """Multi-head self-attention; with a `LayerCache` it appends the new keys/values and the
    new queries attend over cached + new positions (causally within the new chunk)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        causal: bool = False,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """`attn_mask` (boolean, True = may attend) replaces the plain causal mask."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        past = 0
        if cache is not None:
            if cache.keys is not None:
                past = cache.keys.shape[2]
                k = torch.cat([cache.keys, k], dim=2)
                v = torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k, v
        if causal and attn_mask is None and past and length > 1:
            # new query i sits at position past + i: it sees every cached key and new keys <= i
            ones = torch.ones(length, past + length, dtype=torch.bool, device=x.device)
            attn_mask = ones.tril(diagonal=past)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            # is_causal aligns the mask top-left: only right without cached keys
            is_causal=causal and attn_mask is None and past == 0,
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


def run_block(block: nn.Module, checkpointing: bool, *args, **kwargs) -> Tensor:
    """`block(*args, **kwargs)`; with `checkpointing` (and autograd on) its activations are
    recomputed in the backward pass instead of stored: less memory for ~1/3 more compute."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


def mlp(dim: int, mlp_ratio: float) -> nn.Sequential:
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """x + attn(ln(x)); x + mlp(ln(x)).

    With `experts` (e.g. ("image", "text")) the block is a VLMo multiway block: attention
    is shared, while the second norm and the feed-forward network are per-expert and
    `forward(..., expert=name)` picks one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        experts: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        if experts is None:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = mlp(dim, mlp_ratio)
        else:
            self.norm2 = nn.ModuleDict({e: nn.LayerNorm(dim) for e in experts})
            self.mlp = nn.ModuleDict({e: mlp(dim, mlp_ratio) for e in experts})

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        causal: bool = False,
        expert: str | None = None,
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, causal=causal)
        if isinstance(self.mlp, nn.ModuleDict):
            return x + self.mlp[expert](self.norm2[expert](x))
        return x + self.mlp(self.norm2(x))


class TextEmbedding(nn.Module):
    """Token + learned position embeddings. `offset` continues the positions after cached
    ones (incremental decoding)."""

    def __init__(self, vocab_size: int, context_length: int, width: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.empty(context_length, width))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.01)

    def no_weight_decay(self) -> set[str]:
        return {"position", "token.weight"}

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        end = offset + ids.shape[1]
        if end > self.position.shape[0]:
            raise ValueError(
                f"text length {end} exceeds the context length {self.position.shape[0]}"
            )
        return self.token(ids) + self.position[offset:end]


def pool_text(tokens: Tensor, mask: Tensor, pool: str) -> Tensor:
    """`cls`: the first (BOS) token; `eos`: the last real token (captions end with EOS)."""
    if pool == "cls":
        return tokens[:, 0]
    last = mask.long().sum(dim=1) - 1
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


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
