"""Sigmoid image-text loss (SigLIP): an independent binary decision for every pair in a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.objectives.base import (
    EncodingCache,
    Objective,
    ObjectiveOutput,
    at_least_float32,
)
from polymodal.utils.distributed import neighbour_exchange, rank_and_world


def _pair_loss(image_emb, text_emb, logit_scale, logit_bias, positives: bool) -> Tensor:
    """-sum log sigmoid(z * logits) over a block of pairs; z = +1 on the diagonal only
    when the block pairs the same samples (`positives`), else -1 everywhere."""
    logits = logit_scale * image_emb @ text_emb.T + logit_bias
    labels = -torch.ones_like(logits)
    if positives:
        labels = labels + 2 * torch.eye(logits.shape[0], device=logits.device)
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    distributed: bool = False,
) -> Tensor:
    """-sum_ij log sigmoid(z_ij * (s * <f_i, g_j> + b)) / B for L2-normalised embeddings.

    z_ij is +1 for matching pairs (the diagonal) and -1 otherwise. Dividing the sum over the
    B x B matrix by B (not B^2) follows open_clip's `SigLipLoss`. With `distributed`, the
    text features travel around the ring of ranks (W - 1 neighbour exchanges, no full
    gather) so each rank scores its images against every text; the mean over ranks equals
    the loss of the global batch. Computed in float32 even under autocast.
    """
    world = rank_and_world()[1] if distributed else 1
    with torch.autocast(image_emb.device.type, enabled=False):
        image_emb, text_emb = at_least_float32(image_emb), at_least_float32(text_emb)
        loss = _pair_loss(image_emb, text_emb, logit_scale, logit_bias, positives=True)
        for _ in range(world - 1):
            text_emb = neighbour_exchange(text_emb)
            loss = loss + _pair_loss(image_emb, text_emb, logit_scale, logit_bias, False)
        return loss / image_emb.shape[0]


class SigLIPObjective(Objective):
    """SigLIP loss between two modalities at the model's learned temperature and bias.

    SigLIP initialises the scale at 10 and the bias at -10 (with B - 1 negatives per
    positive, a strongly negative bias keeps the initial loss from being dominated by the
    negatives): its `part_defaults`, used where `model.logit_scale.init` /
    `model.logit_bias.init` are null. Training exchanges texts with the other ranks;
    validation scores each rank's batch on its own.
    """

    parts = ("logit_scale", "logit_bias")
    part_defaults = {"logit_scale": {"init": 10.0}, "logit_bias": {"init": -10.0}}

    def __init__(self, modalities: tuple[str, str] | None = None):
        super().__init__()
        # None: (the batch's modality besides text, text): cache.paired_modality
        self.modalities = None if modalities is None else tuple(modalities)

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        return self.modalities or (cache.paired_modality, "text")

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        scale, bias = cache.model.contrastive_scale()
        first, second = self.needs(cache)
        loss = siglip_loss(
            cache.embedding(first), cache.embedding(second), scale, bias, distributed=self.training
        )
        logs = {"logit_scale": scale.detach(), "logit_bias": bias.detach()}
        return ObjectiveOutput(loss=loss, logs=logs)
