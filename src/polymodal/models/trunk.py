"""A Transformer over the tokens of one or several modalities.

Each modality brings a `Stem` (raw input -> tokens, its attention mask, its pooling); the
trunk runs the blocks and a per-modality final norm. One trunk with one stem is a tower of
`model.sharing=separate`; one trunk with every stem is `multiway` (VLMo: shared attention,
a feed-forward expert and norm per modality) or `shared` (all weights shared).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from polymodal.models.transformer import Block, run_block


class Stem(nn.Module):
    """Turns one modality's input into tokens of width `width`.

    Subclasses set `input_key` (and `mask_key`, the batch's padding mask, or None) and
    implement `forward(x, keep) -> tokens`, `attn_mask(mask)` and `pool(tokens, mask)`.
    `tower` builds the encoder this modality gets under `model.sharing=separate`.
    """

    input_key: str
    mask_key: str | None = None

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def attn_mask(self, mask: Tensor | None) -> Tensor | None:
        """Boolean SDPA mask (True = may attend) for the blocks, or None (full attention)."""
        return None

    def pool(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    @classmethod
    def tower(cls, name: str, stem: Mapping, tower: Mapping) -> nn.Module:
        """This modality's own encoder: a trunk of `tower` (width, depth, num_heads, ...)."""
        return Trunk({name: cls(width=tower["width"], **stem)}, **tower)


class Trunk(nn.Module):
    def __init__(
        self,
        stems: Mapping[str, Stem],
        width: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        multiway: bool = False,
    ) -> None:
        super().__init__()
        self.stems = nn.ModuleDict(stems)
        experts = tuple(stems) if multiway else None
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout, experts=experts) for _ in range(depth)
        )
        self.norms = nn.ModuleDict({name: nn.LayerNorm(width) for name in stems})
        self.width = width
        self.multiway = multiway
        self.grad_checkpointing = False

    def encode(
        self, modality: str, x: Tensor, mask: Tensor | None = None, keep: Tensor | None = None
    ) -> Tensor:
        """Tokens [B, L, width]; `keep` [B, K] encodes only those patches (MAE masking)."""
        stem = self.stems[modality]
        h = stem(x, keep)
        attn_mask = stem.attn_mask(mask)
        expert = modality if self.multiway else None
        for block in self.blocks:
            h = run_block(block, self.grad_checkpointing, h, attn_mask=attn_mask, expert=expert)
        return self.norms[modality](h)

    def pool(self, modality: str, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.stems[modality].pool(tokens, mask)

    def layer_groups(self) -> list[list[str]]:
        """Parameter names from input to output as timm groups a ViT: the stems, then a
        group per block, the final norms joining the last (for locking all but the last)."""
        names = [name for name, _ in self.named_parameters()]
        groups = [[n for n in names if n.startswith("stems.")]]
        groups += [
            [n for n in names if n.startswith(f"blocks.{i}.")] for i in range(len(self.blocks))
        ]
        groups[-1] += [n for n in names if n.startswith("norms.")]
        return groups

    def stem(self, modality: str) -> Stem:
        return self.stems[modality]
