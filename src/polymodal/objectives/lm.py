"""Language modelling (GPT): teacher-forced next-token prediction of the text alone by the
caption decoder with its cross-attention skipped, so the same decoder can also caption
(CoCa-style caption + LM) and `polymodal.load(ckpt).complete(prompts)` continues text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.objectives.base import EncodingCache, Objective, ObjectiveOutput
from polymodal.objectives.caption import next_token_loss


def lm_logits(cache: EncodingCache) -> Tensor:
    """Next-token logits [N, L - 1, V] of the batch's texts by the decoder without memory;
    computed once per step (the objective and validation's perplexity share it)."""
    ids, mask = cache.batch["text_ids"], cache.batch["text_mask"]
    return cache.get(
        "lm_logits", lambda: cache.model.decode(ids[:, :-1], None, text_mask=mask[:, :-1])
    )


@torch.no_grad()
def token_nll(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(summed negative log-likelihood, number of predicted tokens) of texts `ids` [N, L]
    (`mask` True for real tokens) under next-token `logits` [N, L - 1, V]: every real token
    after BOS, EOS included. exp(sum / count) over a set is its perplexity."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
    real = mask[:, 1:]
    return (nll * real).sum(), real.sum()


class LMObjective(Objective):
    parts = ("decoder",)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        return ("text",)

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        ids, mask = cache.batch["text_ids"], cache.batch["text_mask"]
        loss = next_token_loss(lm_logits(cache), ids, mask, self.label_smoothing)
        return ObjectiveOutput(loss=loss)
