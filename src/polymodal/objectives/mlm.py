"""Image-conditioned masked language modeling (ALBEF/BLIP/FLAVA).

15% of the real, non-special caption tokens are chosen; of those 80% become [MASK], 10% a
random token and 10% stay; the fused encoder (text cross-attending to the image) predicts
the originals. Validation also masks every colour/shape word and compares accuracy with
the true image against a shuffled one: the gap is what the image contributes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.objectives.base import IGNORE_INDEX, EncodingCache, Objective, ObjectiveOutput


def mask_tokens(
    ids: Tensor,
    text_mask: Tensor,
    mask_id: int,
    special_ids: Tensor,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking. `special_ids` (pad, bos, eos, ...; anywhere in the vocabulary, e.g.
    GPT-2's <|endoftext|> is its last id) are never chosen nor drawn as random
    replacements; each sequence with a candidate gets at least one masked token.
    Returns (inputs, labels)."""
    device = ids.device
    candidates = text_mask & ~torch.isin(ids, special_ids)
    scores = torch.rand(ids.shape, generator=generator, device=device)
    chosen = candidates & (scores < prob)
    # guarantee one masked token per sequence: the candidate with the lowest score
    first = scores.masked_fill(~candidates, 2.0).argmin(dim=1, keepdim=True)
    has_candidate = candidates.any(dim=1, keepdim=True)
    chosen |= torch.zeros_like(chosen).scatter(1, first, True) & has_candidate
    labels = ids.masked_fill(~chosen, IGNORE_INDEX)
    action = torch.rand(ids.shape, generator=generator, device=device)
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
    ordinary[special_ids] = False
    ordinary_ids = ordinary.nonzero().squeeze(1)
    pick = torch.randint(len(ordinary_ids), ids.shape, generator=generator, device=device)
    random_ids = ordinary_ids[pick]
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


class MLMObjective(Objective):
    parts = ("fusion", "mlm_head")

    def __init__(
        self, mask_prob: float = 0.15, eval_attributes: tuple[str, ...] = ("color", "shape")
    ) -> None:
        super().__init__()
        self.mask_prob = mask_prob
        self.eval_attributes = tuple(eval_attributes)
        self.mask_id: int | None = None
        self.register_buffer("special_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("word_ids", torch.empty(0, dtype=torch.long), persistent=False)

    def setup(self, tokenizer, class_names: dict[str, list[str]]) -> None:
        """Learn the mask and special token ids (a tokenizer without a mask token is a
        ConfigError naming it) and which token ids are whole attribute words (for eval)."""
        self.mask_id = tokenizer.mask_id
        device = self.word_ids.device
        self.special_ids = torch.tensor(sorted(tokenizer.special_ids), device=device)
        words = [w for a in self.eval_attributes for w in class_names.get(a, [])]
        ids, mask = tokenizer.encode(words) if words else (None, None)
        single = (
            []
            if ids is None
            else [row[1].item() for row, m in zip(ids, mask, strict=True) if m.sum() == 3]
        )  # BOS word EOS
        self.word_ids = torch.tensor(single, dtype=torch.long, device=device)

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        return (cache.model.fusion_memory, "text")

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        if self.mask_id is None:
            raise RuntimeError("MLMObjective.setup(tokenizer, ...) was not called")
        ids, mask = cache.batch["text_ids"], cache.batch["text_mask"]
        model = cache.model
        inputs, labels = mask_tokens(
            ids, mask, self.mask_id, self.special_ids, model.vocab_size, self.mask_prob
        )
        text_tokens = model.encode("text", inputs, mask)
        memory = cache.tokens(model.fusion_memory)
        logits = model.masked_token_logits(text_tokens, mask, memory)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        chosen = labels != IGNORE_INDEX
        acc = (logits.argmax(-1)[chosen] == labels[chosen]).float().mean()
        return ObjectiveOutput(loss=loss, logs={"acc": acc.detach()})

    @torch.no_grad()
    def validation_metrics(self, cache: EncodingCache) -> dict[str, tuple[Tensor, int]]:
        """Accuracy on every colour/shape word masked at once, with the true and a shuffled
        image. `word_acc` counts captions of single-object images only (their json has the
        attributes), where the image alone determines each word; in two-object captions
        ("a red circle and a blue star") the order is often arbitrary, so `word_acc_all`
        (every caption) is capped below 1 even for a perfect model."""
        ids = cache.batch["text_ids"]
        words = torch.isin(ids, self.word_ids) & cache.batch["text_mask"]
        single = torch.tensor(
            [all(a in m for a in self.eval_attributes) for m in cache.batch["meta"]],
            device=ids.device,
        )
        if not words.any():
            return {}
        mask = cache.mask("text")
        inputs = ids.masked_fill(words, self.mask_id)
        text_tokens = cache.model.encode("text", inputs, mask)
        image_tokens = cache.tokens(cache.model.fusion_memory)
        shuffled = image_tokens.roll(1, dims=0)
        metrics = {}
        for suffix, tokens in (("", image_tokens), ("_shuffled_image", shuffled)):
            logits = cache.model.masked_token_logits(text_tokens, mask, tokens)
            correct = logits.argmax(-1) == ids
            for name, chosen in (("word_acc", words & single[:, None]), ("word_acc_all", words)):
                if chosen.any():
                    metrics[name + suffix] = (correct[chosen].float().mean(), int(chosen.sum()))
        return metrics
