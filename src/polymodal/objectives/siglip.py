"""Sigmoid image-text loss (SigLIP): an independent binary decision for every pair in a batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.objectives.base import EncodingCache, Objective, ObjectiveOutput


def siglip_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor
) -> Tensor:
    """-sum_ij log sigmoid(z_ij * (s * <f_i, g_j> + b)) / B for L2-normalised embeddings.

    z_ij is +1 for matching pairs (the diagonal) and -1 otherwise. Dividing the sum over the
    B x B matrix by B (not B^2) follows open_clip's `SigLipLoss`.
    """
    logits = logit_scale * image_emb @ text_emb.T + logit_bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


class SigLIPObjective(Objective):
    """SigLIP loss with a learnable temperature and bias.

    The log-scale starts at ln(10) and the bias at -10 (SigLIP's init: with B - 1 negatives
    per positive, a strongly negative bias keeps the initial loss from being dominated by the
    negatives). The log-scale is clamped to [0, ln(max_logit_scale)] after every optimizer
    step, as in ITCObjective and open_clip.
    """

    def __init__(
        self,
        init_logit_scale: float = 10.0,
        init_logit_bias: float = -10.0,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        scale = self.logit_scale.exp()
        loss = siglip_loss(cache.image_embedding(), cache.text_embedding(), scale, self.logit_bias)
        logs = {"logit_scale": scale.detach(), "logit_bias": self.logit_bias.detach()}
        return ObjectiveOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)
