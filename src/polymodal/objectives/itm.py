"""Image-text matching (ALBEF/BLIP): matched vs. unmatched on the fused [CLS] token.

Negatives are hard: for each image one text, and for each text one image, drawn from the
softmax of the same step's ITC similarities, never the positive and never a pair that
shares an image id or an identical caption (which would be a false negative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.data.meta import IMAGE_ID
from polymodal.objectives.base import EncodingCache, Objective, ObjectiveOutput


def same_pair_mask(image_ids: list[str], captions: list[str], device=None) -> Tensor:
    """[B, B] True where sample i and j share an image id or have identical captions."""

    def codes(values: list[str]) -> Tensor:
        index: dict[str, int] = {}
        return torch.tensor([index.setdefault(v, len(index)) for v in values], device=device)

    image, caption = codes(image_ids), codes(captions)
    return (image[:, None] == image[None]) | (caption[:, None] == caption[None])


def sample_hard_negatives(
    sim: Tensor, same: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """For each row of `sim` [B, B] a column drawn from softmax(sim[row]) over allowed
    columns (`~same`). Returns (index [B], valid [B]); rows with no allowed column are
    invalid (their index is 0 and must not be used)."""
    logits = sim.float().masked_fill(same, float("-inf"))
    valid = ~same.all(dim=1)
    probs = torch.softmax(logits[valid], dim=1)
    index = torch.zeros(sim.shape[0], dtype=torch.long, device=sim.device)
    if valid.any():
        index[valid] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return index, valid


def batch_ids(batch: dict) -> tuple[list[str], list[str]]:
    """Image ids (`image_id` in the json metadata, else the sample key) and captions."""
    image_ids = [str(m.get(IMAGE_ID, k)) for m, k in zip(batch["meta"], batch["key"], strict=True)]
    return image_ids, list(batch["text"])


class ITMObjective(Objective):
    parts = ("fusion", "itm_head")

    def match_logits(self, cache: EncodingCache, text_index: Tensor, image_index: Tensor):
        """ITM logits [N, 2] for pairs (text_index[n], image_index[n]) of the batch."""
        text_tokens, memory = cache.tokens("text"), cache.tokens(cache.model.fusion_memory)
        mask = cache.mask("text")
        return cache.model.match_logits(
            text_tokens[text_index], mask[text_index], memory[image_index]
        )

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        return (cache.model.fusion_memory, "text")

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        batch = cache.batch
        ids = batch["text_ids"]
        size = ids.shape[0]
        arange = torch.arange(size, device=ids.device)
        with torch.no_grad():
            sim = cache.embedding(cache.model.fusion_memory) @ cache.embedding("text").T
            same = same_pair_mask(*batch_ids(batch), device=sim.device)
            neg_text, text_ok = sample_hard_negatives(sim, same)
            neg_image, image_ok = sample_hard_negatives(sim.T, same.T)
        text_index = torch.cat([arange, neg_text[text_ok], arange[image_ok]])
        image_index = torch.cat([arange, arange[text_ok], neg_image[image_ok]])
        labels = torch.cat(
            [
                torch.ones_like(arange),
                torch.zeros(len(text_index) - size, dtype=torch.long, device=arange.device),
            ]
        )
        logits = self.match_logits(cache, text_index, image_index)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return ObjectiveOutput(loss=loss, logs={"acc": acc.detach()})

    @torch.no_grad()
    def validation_metrics(self, cache: EncodingCache) -> dict[str, tuple[Tensor, int]]:
        """Accuracy on balanced pairs: every positive plus one random allowed negative."""
        batch = cache.batch
        same = same_pair_mask(*batch_ids(batch), device=batch["text_ids"].device)
        uniform = torch.zeros(same.shape, device=same.device)
        neg_text, ok = sample_hard_negatives(uniform, same)
        arange = torch.arange(same.shape[0], device=same.device)
        text_index = torch.cat([arange[ok], neg_text[ok]])
        image_index = torch.cat([arange[ok], arange[ok]])
        labels = torch.cat([torch.ones_like(arange[ok]), torch.zeros_like(arange[ok])])
        pred = self.match_logits(cache, text_index, image_index).argmax(dim=1)
        return {"acc_balanced": ((pred == labels).float().mean(), len(labels))}
