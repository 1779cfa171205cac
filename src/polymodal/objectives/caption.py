"""Captioning (CoCa/BLIP LM loss): teacher-forced next-token prediction of the caption
by the causal decoder cross-attending to the image tokens; padding is ignored."""

from __future__ import annotations

import torch.nn.functional as F

from polymodal.models.backbone import Backbone
from polymodal.objectives.base import EncodingCache, Objective, ObjectiveOutput

IGNORE_INDEX = -100


def caption_loss(logits, ids, mask, label_smoothing: float = 0.0):
    """CE of logits[:, t] against ids[:, t + 1] where mask[:, t + 1] (real tokens only)."""
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return F.cross_entropy(
        logits.flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


class CaptionObjective(Objective):
    def __init__(self, backbone: Backbone, label_smoothing: float = 0.0) -> None:
        super().__init__()
        backbone.require("decoder")
        self.label_smoothing = label_smoothing

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        ids, mask = cache.batch["text_ids"], cache.batch["text_mask"]
        logits = cache.backbone.decode(ids[:, :-1], cache.image_tokens(), text_mask=mask[:, :-1])
        return ObjectiveOutput(loss=caption_loss(logits, ids, mask, self.label_smoothing))
