"""Image-text contrastive (CLIP) objective: symmetric cross-entropy over a batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.objectives.base import EncodingCache, Objective, ObjectiveOutput


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """0.5 * (CE(s * I T^T, diag) + CE(s * T I^T, diag)) for L2-normalised embeddings."""
    logits = logit_scale * image_emb @ text_emb.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class ITCObjective(Objective):
    """CLIP loss with a learnable temperature.

    The log-scale starts at ln(1/0.07) and is clamped to [0, ln(max_logit_scale)] after
    every optimizer step, as in CLIP/open_clip.
    """

    def __init__(self, init_logit_scale: float = 1 / 0.07, max_logit_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        scale = self.logit_scale.exp()
        loss = clip_loss(cache.image_embedding(), cache.text_embedding(), scale)
        return ObjectiveOutput(loss=loss, logs={"logit_scale": scale.detach()})

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)
