"""What every objective shares: the per-step encoding cache and the output contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from polymodal.models.model import PolymodalModel


class NoPairedModality(ValueError):
    """A batch holds no modality besides text to pair with it."""


class EncodingCache:
    """Encodes each modality of one batch at most once per step, on first request.

    Several objectives in one step (ITC + ITM + MLM ...) read the same image tokens and
    embeddings from here instead of running the encoders again. Objective-specific views
    (masked text for MLM, visible patches for MIM) go through `get` with their own name.
    """

    def __init__(self, model: PolymodalModel, batch: dict) -> None:
        self.model = model
        self.batch = batch
        self._store: dict[str, object] = {}

    def get(self, name: str, compute: Callable[[], object]):
        if name not in self._store:
            self._store[name] = compute()
        return self._store[name]

    def holds(self, modality: str) -> bool:
        return self.model.input_key(modality) in self.batch

    @property
    def paired_modality(self) -> str:
        """What this batch's texts describe: the first of the model's modalities other
        than text that the batch holds (a mix of image-text and audio-text sources pairs
        each batch with its own). The default of contrastive pairs."""
        for modality in self.model.modalities:
            if modality != "text" and self.holds(modality):
                return modality
        raise NoPairedModality(f"a batch holds none of {self.model.modalities} besides text")

    def mask(self, modality: str) -> Tensor | None:
        return self.model.inputs(self.batch, modality)[1]

    def tokens(self, modality: str) -> Tensor:
        return self.get(
            f"{modality}_tokens",
            lambda: self.model.encode(modality, *self.model.inputs(self.batch, modality)),
        )

    def embedding(self, modality: str) -> Tensor:
        def compute() -> Tensor:
            pooled = self.model.pool(modality, self.tokens(modality), self.mask(modality))
            return self.model.project(modality, pooled)

        return self.get(f"{modality}_embedding", compute)


IGNORE_INDEX = -100  # label of positions no loss is taken on (padding, unmasked tokens)


def at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32 (or kept in float64): losses on autocast outputs need the precision."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class ObjectiveOutput:
    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """A loss over the model's outputs: `forward(cache) -> ObjectiveOutput`.

    Objectives hold no weights: the heads and temperatures they use are parts of the model,
    and `parts` names them (the app builds the model with them, `part_defaults` filling
    the part settings the model config leaves null).
    """

    parts: ClassVar[tuple[str, ...]] = ()
    # settings of those parts this objective starts from when the model config leaves
    # them null, e.g. SigLIP's {"logit_scale": {"init": 10.0}}
    part_defaults: ClassVar[dict[str, dict]] = {}

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        raise NotImplementedError

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        """The modalities this objective reads from the batch; a batch without one of them
        (e.g. an audio-text batch for MIM, in a mix of sources) skips the objective. An
        objective that does not override it runs on every batch that holds text."""
        return ("text",)

    def setup(self, tokenizer, class_names: dict[str, list[str]]) -> None:
        """Called once data is known: the tokenizer and the attribute class names."""

    def validation_metrics(self, cache: EncodingCache) -> dict[str, tuple[Tensor, int]]:
        """Extra validation metrics as {name: (value, weight)}, averaged over the epoch."""
        return {}
