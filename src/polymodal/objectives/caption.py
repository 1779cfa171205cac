"""Captioning (CoCa/BLIP LM loss): teacher-forced next-token prediction of the caption
by the causal decoder cross-attending to the image tokens; padding is ignored."""

from __future__ import annotations

import torch.nn.functional as F

from polymodal.objectives.base import IGNORE_INDEX, EncodingCache, Objective, ObjectiveOutput
from polymodal.utils.errors import ConfigError


def next_token_loss(logits, ids, mask, label_smoothing: float = 0.0):
    """CE of logits[:, t] against ids[:, t + 1] where mask[:, t + 1] (real tokens only)."""
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return F.cross_entropy(
        logits.flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


class CaptionObjective(Objective):
    parts = ("decoder",)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        if cache.model.decoder_memory is None:
            raise ConfigError(
                "task.objectives.caption: this model holds only text, nothing to caption "
                "(a language model of text is task.objectives.lm)"
            )
        return (cache.model.decoder_memory, "text")

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        ids, mask = cache.batch["text_ids"], cache.batch["text_mask"]
        memory = cache.tokens(cache.model.decoder_memory)
        logits = cache.model.decode(ids[:, :-1], memory, text_mask=mask[:, :-1])
        return ObjectiveOutput(loss=next_token_loss(logits, ids, mask, self.label_smoothing))
