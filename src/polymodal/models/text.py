"""Text stem: token + position embeddings, a causal or bidirectional padding mask, EOS or
CLS pooling."""

from __future__ import annotations

from torch import Tensor

from polymodal.models.transformer import TextEmbedding, padding_attn_mask, pool_text
from polymodal.models.trunk import Stem


class TextStem(Stem):
    """`pool="eos"` takes the last real token (the tokenizer always ends a caption with
    EOS), which is what a causal tower must use; `pool="cls"` takes the first (BOS) token,
    the BERT convention for a bidirectional (`causal=false`) tower."""

    input_key, mask_key = "text_ids", "text_mask"

    def __init__(
        self,
        width: int,
        vocab_size: int,
        context_length: int = 32,
        causal: bool = True,
        pool: str = "eos",
    ) -> None:
        super().__init__()
        if pool not in ("eos", "cls"):
            raise ValueError(f"model.stems.text.pool must be 'eos' or 'cls', got {pool!r}")
        self.embed = TextEmbedding(vocab_size, context_length, width)
        self.causal, self.pool_type = causal, pool
        self.context_length = context_length

    def forward(self, ids: Tensor, keep: Tensor | None = None) -> Tensor:
        if keep is not None:
            raise ValueError("text tokens cannot be dropped (keep=) before the encoder")
        return self.embed(ids)

    def attn_mask(self, mask: Tensor | None) -> Tensor | None:
        if mask is None:
            raise ValueError("text needs its padding mask (True = real token)")
        return padding_attn_mask(mask, self.causal)

    def pool(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        return pool_text(tokens, mask, self.pool_type)
