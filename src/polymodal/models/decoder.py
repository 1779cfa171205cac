"""Causal text decoder with cross-attention to encoder tokens, for captioning (CoCa/BLIP style).

Each block is pre-norm causal self-attention, cross-attention to a `memory` (e.g. image patch
tokens) and an MLP. Without a memory the cross-attention is skipped and the decoder is a
plain causal language model (GPT) over the same weights, so captioning and text-only
language modelling can train one decoder together. A `KVCache` makes generation
incremental: each step feeds only the new tokens, and the memory's keys/values are
projected once and reused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models.transformer import (
    LayerCache,
    SelfAttention,
    TextEmbedding,
    mlp,
    padding_attn_mask,
    run_block,
)


class KVCache:
    """Per-layer attention state for incremental decoding.

    Self-attention keys/values grow by the fed positions every call; cross-attention keys/values
    are computed from the memory on the first call and reused (later `memory` args are ignored).
    """

    def __init__(self, depth: int) -> None:
        self.layers = [LayerCache() for _ in range(depth)]

    @property
    def length(self) -> int:
        """Number of cached positions (the next token's position index)."""
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (LongTensor [N']) of every stored tensor: re-chosen beams."""
        for layer in self.layers:
            for name in ("keys", "values", "memory_keys", "memory_values"):
                tensor = getattr(layer, name)
                if tensor is not None:
                    setattr(layer, name, tensor.index_select(0, index))


class CrossAttention(nn.Module):
    """Queries from the text stream, keys/values projected from the memory (memory_dim -> dim)."""

    def __init__(self, dim: int, memory_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(memory_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        if cache is not None and cache.memory_keys is not None:
            k, v = cache.memory_keys, cache.memory_values
        else:
            kv = self.kv(memory).view(batch, memory.shape[1], 2, self.num_heads, head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            if cache is not None:
                cache.memory_keys, cache.memory_values = k, v
        attn_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class DecoderBlock(nn.Module):
    """x + self_attn(ln(x)); x + cross_attn(ln(x), memory); x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, memory_dim: int | None) -> None:
        """`memory_dim=None` builds no cross-attention (a decoder of text alone)."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = self.cross_attn = None
        if memory_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, memory_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """`memory_mask` [N, M] (True = valid); `attn_mask` [N, 1, L, L] replaces plain causal;
        `memory=None` skips the cross-attention."""
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, causal=True, cache=cache)
        if memory is not None:
            if self.cross_attn is None:
                raise ValueError("this decoder has no cross-attention: it takes no memory")
            x = x + self.cross_attn(self.norm2(x), memory, memory_mask=memory_mask, cache=cache)
        return x + self.mlp(self.norm3(x))


class CaptionDecoder(nn.Module):
    """Token + learned position embeddings, `DecoderBlock`s, final LayerNorm, tied LM head.
    `memory_dim=None`: no cross-attention is built (a language model of text alone)."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 32,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        memory_dim: int | None = 128,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.embed = TextEmbedding(vocab_size, context_length, width)
        self.blocks = nn.ModuleList(
            DecoderBlock(width, num_heads, mlp_ratio, memory_dim) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.grad_checkpointing = False

    def init_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(
        self,
        ids: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Next-token logits [N, L, vocab] for ids [N, L] attending to memory [N, M, memory_dim]
        (None: to nothing, a text-only language model).

        `memory_mask` [N, M] (True = valid) needs at least one valid memory token per row.
        `text_mask` [N, L] (True = real token) hides padding keys during teacher forcing; with
        right padding it only changes the (ignored) padded rows, since causality already hides
        later keys. With a `cache`, `ids` are only the new tokens and positions continue from
        `cache.length`.
        """
        past = 0 if cache is None else cache.length
        length = ids.shape[1]
        if past + length > self.context_length:
            raise ValueError(
                f"decoder sequence length {past + length} (cached {past} + new {length}) exceeds "
                f"context_length {self.context_length}"
            )
        if text_mask is not None and cache is not None:
            raise ValueError("text_mask is for teacher forcing and cannot be used with a cache")
        x = self.embed(ids, offset=past)
        # padding_attn_mask keeps each query's own key, so no row is fully masked (no NaNs).
        attn_mask = None if text_mask is None else padding_attn_mask(text_mask, causal=True)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            x = run_block(
                block,
                self.grad_checkpointing and cache is None,
                x,
                memory,
                memory_mask=memory_mask,
                attn_mask=attn_mask,
                cache=layer_cache,
            )
        return F.linear(self.norm(x), self.embed.token.weight)
