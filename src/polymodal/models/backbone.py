"""The Backbone owns every modality tower and projection; objectives only call its methods.

Surface (see docs/architecture.md): `encode_image`, `encode_text`, `pool`, `project`,
`embed_image`, `embed_text`. Fusion, decoding and audio grow here in later issues.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models.image import create_image_tower, image_features, pool_image
from polymodal.models.text import TextTransformer


class Backbone(nn.Module):
    def __init__(
        self,
        image: dict,
        text: dict,
        embed_dim: int = 128,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if vocab_size is None:
            raise ValueError("model.vocab_size is unset: it comes from the tokenizer")
        self.image_tower = create_image_tower(**image)
        self.text_tower = TextTransformer(vocab_size=vocab_size, **text)
        image_width = self.image_tower.num_features
        self.image_proj = nn.Linear(image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_tower.width, embed_dim, bias=False)
        self.embed_dim = embed_dim

    def encode_image(self, images: Tensor) -> Tensor:
        return image_features(self.image_tower, images)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text_tower(ids, mask)

    def pool(self, tokens: Tensor, modality: str, mask: Tensor | None = None) -> Tensor:
        if modality == "image":
            return pool_image(self.image_tower, tokens)
        if modality == "text":
            return self.text_tower.pool(tokens, mask)
        raise ValueError(f"unknown modality {modality!r}")

    def project(self, pooled: Tensor, modality: str) -> Tensor:
        """Projected, L2-normalised embedding in the shared space."""
        proj = {"image": self.image_proj, "text": self.text_proj}[modality]
        return F.normalize(proj(pooled), dim=-1)

    def embed_image(self, images: Tensor) -> Tensor:
        return self.project(self.pool(self.encode_image(images), "image"), "image")

    def embed_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        tokens = self.encode_text(ids, mask)
        return self.project(self.pool(tokens, "text", mask), "text")
