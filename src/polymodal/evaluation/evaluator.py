"""Collects validation embeddings and turns them into zero-shot and retrieval metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from polymodal.data.meta import IMAGE_ID, label_indices
from polymodal.evaluation.retrieval import retrieval_metrics
from polymodal.evaluation.zeroshot import (
    ZeroShotTask,
    build_zeroshot_classifier,
    confusion_matrix,
    zeroshot_metrics,
)
from polymodal.utils.distributed import gather_objects, gather_variable, rank_and_world
from polymodal.utils.errors import ConfigError


def image_of(meta: Mapping, group_by: str | None, sample: object) -> tuple:
    """Which image a sample shows: its json `group_by` value (COCO's `image_id`) when it
    has one, else the sample itself (`sample`: its index or key)."""
    group = meta.get(group_by) if group_by else None
    return ("sample", sample) if group is None else ("group", str(group))


class EmbeddingEvaluator:
    """Zero-shot attribute classification + image/text retrieval on a held-out split.

    `zeroshot` maps an attribute (a top-level field of each sample's `{key}.json`) to its
    resolved task (class names, templates, phrases; see `zeroshot.zeroshot_tasks`). A
    sample's label is its json value matched by name (a number by its text); samples
    whose json lacks the attribute, or holds a value outside the class list, are not
    scored for it.
    """

    def __init__(
        self,
        zeroshot: Mapping[str, ZeroShotTask] | None = None,
        retrieval: bool = True,
        retrieval_chunk_size: int = 1024,
        group_by: str | None = IMAGE_ID,
    ) -> None:
        self.zeroshot = dict(zeroshot or {})
        self.retrieval = retrieval
        self.retrieval_chunk_size = retrieval_chunk_size
        self.group_by = group_by
        self.reset()

    def reset(self) -> None:
        self._image: list[Tensor] = []
        self._text: list[Tensor] = []
        self._meta: list[dict] = []
        self._captions: list[str] = []

    def classes(self, attribute: str) -> list[str]:
        return self.zeroshot[attribute].classes

    def update(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        meta: Sequence[dict],
        captions: Sequence[str] | None = None,
    ) -> None:
        """Add a batch; `captions` (the texts) are kept for retrieval tables."""
        self._image.append(image_emb.detach().float().cpu())
        self._text.append(text_emb.detach().float().cpu())
        self._meta.extend(meta)
        self._captions.extend(captions if captions is not None else [""] * len(meta))

    def gather(self, device: torch.device | str = "cpu") -> None:
        """Replace this rank's collected samples by every rank's, in rank order (DDP
        validation gives each rank a share of the val set; metrics need all of it).
        `device` is where the collective runs (CUDA tensors for NCCL)."""
        if rank_and_world()[1] == 1:
            return
        image, text = (gather_variable(t.to(device)).cpu() for t in self.embeddings())
        self._image, self._text = [image], [text]
        pairs = gather_objects(list(zip(self._meta, self._captions, strict=True)))
        self._meta = [meta for meta, _ in pairs]
        self._captions = [caption for _, caption in pairs]

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """All (image, text) embeddings collected since the last reset."""
        return torch.cat(self._image), torch.cat(self._text)

    @property
    def captions(self) -> list[str]:
        """The texts passed to `update` (empty strings where none were), in sample order."""
        return self._captions

    @property
    def metas(self) -> list[dict]:
        """The json metadata passed to `update`, in sample order."""
        return self._meta

    def image_groups(self) -> tuple[Tensor, Tensor]:
        """(first sample of each image [Ni], image index of each sample [N]).

        Samples with equal `group_by` values share an image; a sample without the field is
        an image of its own."""
        first: list[int] = []
        image_index: dict[tuple, int] = {}
        sample_to_image = []
        for i, meta in enumerate(self._meta):
            key = image_of(meta, self.group_by, i)
            if key not in image_index:
                image_index[key] = len(first)
                first.append(i)
            sample_to_image.append(image_index[key])
        return torch.tensor(first), torch.tensor(sample_to_image)

    def labels(self, attribute: str, samples: Tensor | None = None) -> Tensor:
        """Class index of `attribute` for each sample (or only `samples`); -1 if absent."""
        metas = self._meta if samples is None else [self._meta[i] for i in samples.tolist()]
        return label_indices(metas, attribute, self.classes(attribute))

    @torch.no_grad()
    def compute(self, encode_text: Callable[[list[str]], Tensor]) -> dict[str, float]:
        """Metrics named `zeroshot/<attr>_acc`, `zeroshot/mean_acc`, `retrieval/i2t_r1`,
        `retrieval/mean_r1` (of i2t and t2i), ...
        Each attribute's confusion matrix (rows true, columns predicted) is kept in
        `self.confusion`."""
        self.confusion: dict[str, Tensor] = {}
        if not self._image:
            return {}
        image, text = self.embeddings()
        first, sample_to_image = self.image_groups()
        image = image[first]  # one embedding per image, however many captions it has
        metrics: dict[str, float] = {}
        accs = []
        for attribute, task in self.zeroshot.items():
            labels = self.labels(attribute, first)
            if (labels >= 0).sum() == 0:  # a misspelt attribute or class list
                raise ConfigError(
                    f"zeroshot.{attribute}.classes: no val sample has a {attribute!r} json "
                    f"field with one of these classes ({', '.join(task.classes[:5])}, ...)"
                )
            classifier = build_zeroshot_classifier(
                lambda prompts: encode_text(prompts).float().cpu(),
                [task.phrases.get(name, name) for name in task.classes],
                task.templates,
            )
            result = zeroshot_metrics(image, classifier, labels)
            metrics[f"zeroshot/{attribute}_acc"] = result["acc"]
            metrics[f"zeroshot/{attribute}_mean_per_class_acc"] = result["mean_per_class_acc"]
            if "top5" in result:
                metrics[f"zeroshot/{attribute}_top5"] = result["top5"]
            self.confusion[attribute] = confusion_matrix(image, classifier, labels)
            accs.append(result["acc"])
        if accs:
            metrics["zeroshot/mean_acc"] = sum(accs) / len(accs)
        if self.retrieval:
            result = retrieval_metrics(
                image, text, sample_to_image, chunk_size=self.retrieval_chunk_size
            )
            metrics.update({f"retrieval/{k}": v for k, v in result.items()})
            # both directions in one number (what `optimized_metric: auto` picks)
            metrics["retrieval/mean_r1"] = (result["i2t_r1"] + result["t2i_r1"]) / 2
        return metrics
