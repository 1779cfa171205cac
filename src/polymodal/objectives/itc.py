"""Image-text contrastive (CLIP) objective: symmetric cross-entropy over a batch.

Under DDP the negatives are the features of every rank (all-gathered with gradient), so
the loss and its gradients equal those of one process holding the whole global batch.
"""

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
from polymodal.utils.distributed import all_gather_features, rank_and_world


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    distributed: bool = False,
    local_loss: bool = True,
    gather_with_grad: bool = True,
) -> Tensor:
    """0.5 * (CE(s * I T^T, diag) + CE(s * T I^T, diag)) for L2-normalised embeddings.

    With `distributed` (and a process group) every rank's B rows are scored against the
    W * B gathered columns. `local_loss` keeps only this rank's rows (labels rank * B +
    arange(B); memory O(B * W * B)); the mean over ranks (DDP's gradient average) is the
    global-batch loss. Without it each rank computes the full W * B x W * B loss.
    Computed in float32 even under autocast: logits scaled by up to 100 need the precision.
    """
    rank, world = rank_and_world() if distributed else (0, 1)
    with torch.autocast(image_emb.device.type, enabled=False):
        image_emb, text_emb = at_least_float32(image_emb), at_least_float32(text_emb)
        if world == 1:
            logits = logit_scale * image_emb @ text_emb.T
            labels = torch.arange(logits.shape[0], device=logits.device)
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        all_image = all_gather_features(image_emb, gather_with_grad)
        all_text = all_gather_features(text_emb, gather_with_grad)
        if local_loss:
            per_image = logit_scale * image_emb @ all_text.T
            per_text = logit_scale * text_emb @ all_image.T
            offset = rank * image_emb.shape[0]
            labels = torch.arange(offset, offset + image_emb.shape[0], device=image_emb.device)
        else:
            per_image = logit_scale * all_image @ all_text.T
            per_text = per_image.T
            labels = torch.arange(all_image.shape[0], device=image_emb.device)
        return 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))


class ITCObjective(Objective):
    """CLIP loss between two modalities' embeddings at the model's learned temperature.

    Training gathers negatives from every rank (`local_loss`, `gather_with_grad`: see
    `clip_loss`); validation scores each rank's batch on its own, so uneven val batches
    never meet in a collective.
    """

    parts = ("logit_scale",)
    part_defaults = {"logit_scale": {"init": 1 / 0.07}}  # CLIP's temperature 0.07

    def __init__(
        self,
        modalities: tuple[str, str] | None = None,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ):
        super().__init__()
        # None: (the batch's modality besides text, text): cache.paired_modality
        self.modalities = None if modalities is None else tuple(modalities)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        return self.modalities or (cache.paired_modality, "text")

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        scale, _ = cache.model.contrastive_scale()
        first, second = self.needs(cache)
        loss = clip_loss(
            cache.embedding(first),
            cache.embedding(second),
            scale,
            distributed=self.training,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
        )
        return ObjectiveOutput(loss=loss, logs={"logit_scale": scale.detach()})
