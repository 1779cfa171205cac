"""The Backbone owns every modality encoder, projection, fusion encoder and decoder.

Objectives only call its methods (see docs/architecture.md):
`encode_image`, `encode_text`, `pool`, `project`, `embed_image`, `embed_text`, `fuse`,
`decode`. `model.sharing` picks how image and text share weights:

- `separate`: a timm image tower and a text Transformer (CLIP);
- `multiway`: one trunk, shared attention, per-modality feed-forward experts (VLMo);
- `shared`: one trunk with all weights shared.

The fusion encoder and caption decoder are built only when an objective `require`s them,
so a CLIP run carries no unused weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models.decoder import CaptionDecoder
from polymodal.models.fusion import FusionEncoder
from polymodal.models.generation import generate
from polymodal.models.image import TimmImageTower
from polymodal.models.text import TextTransformer
from polymodal.models.trunk import SharedTrunk

SHARING = ("separate", "multiway", "shared")


class SeparateTowers(nn.Module):
    """A timm image tower and a text Transformer, with the SharedTrunk interface."""

    def __init__(self, vocab_size: int, image: dict, text: dict) -> None:
        super().__init__()
        self.image_tower = TimmImageTower(**image)
        self.text_tower = TextTransformer(vocab_size=vocab_size, **text)
        self.patch_size = self.image_tower.patch_size
        self.num_patches = self.image_tower.num_patches
        self.num_prefix_tokens = self.image_tower.num_prefix_tokens
        self.image_width, self.text_width = self.image_tower.width, self.text_tower.width

    def encode_image(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.image_tower.encode(images, keep)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text_tower(ids, mask)

    def pool_image(self, tokens: Tensor) -> Tensor:
        return self.image_tower.pool(tokens)

    def pool_text(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.text_tower.pool(tokens, mask)


def build_encoders(sharing: str, vocab_size: int, image: dict, text: dict, trunk: dict):
    if sharing == "separate":
        return SeparateTowers(vocab_size, image, text)
    if sharing not in SHARING:
        raise ValueError(f"model.sharing must be one of {SHARING}, got {sharing!r}")
    encoders = SharedTrunk(
        vocab_size,
        sharing,
        img_size=image["img_size"],
        patch_size=image["patch_size"],
        conv_stem=image.get("conv_stem", True),
        context_length=text["context_length"],
        causal=text.get("causal", True),
        pool=text.get("pool", "eos"),
        **trunk,
    )
    encoders.image_width = encoders.text_width = encoders.width
    return encoders


class Backbone(nn.Module):
    def __init__(
        self,
        image: dict,
        text: dict,
        embed_dim: int = 128,
        vocab_size: int | None = None,
        sharing: str = "separate",
        trunk: dict | None = None,
        fusion: dict | None = None,
        decoder: dict | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if vocab_size is None:
            raise ValueError("model.vocab_size is unset: it must cover the tokenizer")
        self.sharing = sharing
        self.vocab_size = vocab_size
        self.context_length = text["context_length"]
        self.encoders = build_encoders(sharing, vocab_size, image, text, trunk or {})
        self.image_proj = nn.Linear(self.encoders.image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.encoders.text_width, embed_dim, bias=False)
        self.embed_dim = embed_dim
        self.component_cfg = {"fusion": fusion or {}, "decoder": decoder or {}}
        self.fusion: FusionEncoder | None = None
        self.decoder: CaptionDecoder | None = None
        self.set_grad_checkpointing(grad_checkpointing)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every Transformer block's activations in backward (timm's convention:
        each block stack has a `grad_checkpointing` flag); components built later follow."""
        self.grad_checkpointing = enabled
        for module in self.modules():
            if hasattr(module, "set_grad_checkpointing") and module is not self:
                module.set_grad_checkpointing(enabled)  # timm models
            elif hasattr(module, "grad_checkpointing") and module is not self:
                module.grad_checkpointing = enabled

    def require(self, component: str) -> None:
        """Build the fusion encoder or caption decoder (once) for an objective that uses it."""
        if component == "fusion" and self.fusion is None:
            self.fusion = FusionEncoder(
                width=self.encoders.text_width,
                memory_dim=self.encoders.image_width,
                **self.component_cfg["fusion"],
            )
        elif component == "decoder" and self.decoder is None:
            self.decoder = CaptionDecoder(
                vocab_size=self.vocab_size,
                context_length=self.context_length,
                memory_dim=self.encoders.image_width,
                **self.component_cfg["decoder"],
            )
        elif component not in ("fusion", "decoder"):
            raise ValueError(f"unknown backbone component {component!r}")
        self.set_grad_checkpointing(self.grad_checkpointing)

    # -- unimodal encoders ---------------------------------------------------------------
    @property
    def patch_size(self) -> int | None:
        return self.encoders.patch_size

    @property
    def num_patches(self) -> int | None:
        return self.encoders.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.encoders.num_prefix_tokens

    @property
    def text_width(self) -> int:
        return self.encoders.text_width

    @property
    def image_width(self) -> int:
        return self.encoders.image_width

    def encode_image(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Image tokens; with `keep` [B, K] only those patches (plus CLS) are encoded."""
        return self.encoders.encode_image(images, keep)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.encoders.encode_text(ids, mask)

    def pool(self, tokens: Tensor, modality: str, mask: Tensor | None = None) -> Tensor:
        if modality == "image":
            return self.encoders.pool_image(tokens)
        if modality == "text":
            return self.encoders.pool_text(tokens, mask)
        raise ValueError(f"unknown modality {modality!r}")

    def project(self, pooled: Tensor, modality: str) -> Tensor:
        """Projected, L2-normalised embedding in the shared space."""
        proj = {"image": self.image_proj, "text": self.text_proj}[modality]
        return F.normalize(proj(pooled), dim=-1)

    def embed_image(self, images: Tensor) -> Tensor:
        return self.project(self.pool(self.encode_image(images), "image"), "image")

    def embed_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.project(self.pool(self.encode_text(ids, mask), "text", mask), "text")

    # -- multimodal ----------------------------------------------------------------------
    def fuse(self, text_tokens: Tensor, text_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """Text tokens that cross-attend to image tokens (ALBEF fusion); [CLS] is token 0."""
        if self.fusion is None:
            raise RuntimeError("no fusion encoder: an objective must require('fusion')")
        return self.fusion(text_tokens, text_mask, image_tokens)

    def decode(
        self,
        ids: Tensor,
        memory: Tensor,
        text_mask: Tensor | None = None,
        cache=None,
    ) -> Tensor:
        """Next-token logits of the caption decoder conditioned on `memory` (image tokens)."""
        if self.decoder is None:
            raise RuntimeError("no caption decoder: an objective must require('decoder')")
        return self.decoder(ids, memory, text_mask=text_mask, cache=cache)

    @torch.no_grad()
    def generate(
        self, images: Tensor | None = None, image_tokens: Tensor | None = None, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """Token ids and log-probabilities of captions for `images` (see models.generation)."""
        if self.decoder is None:
            raise RuntimeError("no caption decoder: this model was not trained to caption")
        memory = self.encode_image(images) if image_tokens is None else image_tokens
        return generate(self.decoder, memory, **kwargs)
