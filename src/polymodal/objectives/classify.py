"""Classification fine-tuning: cross-entropy of the model's classifier head on a json label.

The head (`model.classifier`) scores normalised embeddings at the contrastive temperature;
the task module starts it from the zero-shot classifier of the attribute's class prompts
(`init: zeroshot`), so step 0 is zero-shot classification and fine-tuning moves on from
there (WiSE-FT's recipe; open_clip's and LAVIS's fine-tuned classifiers start the same).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from polymodal.data.meta import label_indices
from polymodal.objectives.base import EncodingCache, Objective, ObjectiveOutput, at_least_float32
from polymodal.utils.errors import ConfigError

HEAD_INITS = ("zeroshot", "random")


class ClassifyObjective(Objective):
    """Cross-entropy of `model.classify` on the class of each sample's json `attribute`.

    The classes, in head order, are those of `data.zeroshot.<attribute>`; samples without
    the attribute, or with a value outside the classes, take no loss (as in zero-shot
    evaluation). `modality` is what is classified (null: the batch's modality besides
    text)."""

    parts = ("classifier",)

    def __init__(
        self,
        attribute: str,
        modality: str | None = None,
        init: str = "zeroshot",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise ConfigError(f"task.objectives.classify.init: one of {HEAD_INITS}, got {init!r}")
        self.attribute, self.modality, self.init = attribute, modality, init
        self.label_smoothing = label_smoothing
        self.classes: list[str] = []

    def setup(self, tokenizer, class_names: dict[str, list[str]]) -> None:
        if self.attribute not in class_names:
            raise ConfigError(
                f"task.objectives.classify.attribute: {self.attribute!r} has no class list "
                f"in data.zeroshot (has {sorted(class_names)})"
            )
        self.classes = class_names[self.attribute]

    def needs(self, cache: EncodingCache) -> tuple[str, ...]:
        return (self.modality or cache.paired_modality,)

    def labels(self, cache: EncodingCache) -> Tensor:
        """Class index of each sample of the batch; -1 (no loss) when it has none."""
        labels = label_indices(cache.batch["meta"], self.attribute, self.classes)
        return labels.to(cache.model.classifier.weight.device)

    def logits_and_labels(self, cache: EncodingCache) -> tuple[Tensor, Tensor]:
        (modality,) = self.needs(cache)
        return cache.get(
            "classify",
            lambda: (cache.model.classify(cache.embedding(modality)), self.labels(cache)),
        )

    def forward(self, cache: EncodingCache) -> ObjectiveOutput:
        logits, labels = self.logits_and_labels(cache)
        logits = at_least_float32(logits)
        if (labels < 0).all():  # no labelled sample: a zero loss that keeps the graph
            return ObjectiveOutput(loss=logits.sum() * 0.0)
        loss = F.cross_entropy(
            logits, labels, ignore_index=-1, label_smoothing=self.label_smoothing
        )
        return ObjectiveOutput(loss=loss)

    def validation_metrics(self, cache: EncodingCache) -> dict[str, tuple[Tensor, int]]:
        logits, labels = self.logits_and_labels(cache)
        keep = labels >= 0
        count = int(keep.sum())
        if count == 0:
            return {}
        correct = (logits[keep].argmax(dim=1) == labels[keep]).float().mean()
        return {"acc": (correct, count)}
