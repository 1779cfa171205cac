"""What every objective shares: the per-step encoding cache and the output contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from polymodal.models.backbone import Backbone


class EncodingCache:
    """Encodes each view of one batch at most once per step, on first request.

    Several objectives in one step (ITC + ITM + MLM ...) read the same image tokens and
    embeddings from here instead of running the encoders again. Objective-specific views
    (masked text for MLM, visible patches for MIM) go through `get` with their own name.
    """

    def __init__(self, backbone: Backbone, batch: dict) -> None:
        self.backbone = backbone
        self.batch = batch
        self._store: dict[str, object] = {}

    def get(self, name: str, compute: Callable[[], object]):
        if name not in self._store:
            self._store[name] = compute()
        return self._store[name]

    def image_tokens(self) -> Tensor:
        return self.get("image_tokens", lambda: self.backbone.encode_image(self.batch["image"]))

    def text_tokens(self) -> Tensor:
        return self.get(
            "text_tokens",
            lambda: self.backbone.encode_text(self.batch["text_ids"], self.batch["text_mask"]),
        )

    def image_embedding(self) -> Tensor:
        def compute() -> Tensor:
            pooled = self.backbone.pool(self.image_tokens(), "image")
            return self.backbone.project(pooled, "image")

        return self.get("image_embedding", compute)

    def text_embedding(self) -> Tensor:
        def compute() -> Tensor:
            pooled = self.backbone.pool(self.text_tokens(), "text", self.batch["text_mask"])
            return self.backbone.project(pooled, "text")

        return self.get("text_embedding", compute)


def at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32 (or kept in float64): losses on autocast outputs need the precision."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class ObjectiveOutput:
    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Head + loss. Subclasses implement `forward(cache) -> ObjectiveOutput`.

    Objectives whose heads depend on the backbone's sizes take a `backbone` constructor
    argument (and call `backbone.require(...)` for the fusion encoder or decoder); they
    must not keep a reference to it as a submodule.
    """

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        raise NotImplementedError

    def setup(self, tokenizer, class_names: dict[str, list[str]]) -> None:
        """Called once data is known: the tokenizer and the attribute class names."""

    def validation_metrics(self, cache: EncodingCache) -> dict[str, tuple[Tensor, int]]:
        """Extra validation metrics as {name: (value, weight)}, averaged over the epoch."""
        return {}

    def after_optimizer_step(self) -> None:
        """Hook run once per optimizer step (e.g. to clamp a learnable temperature)."""
