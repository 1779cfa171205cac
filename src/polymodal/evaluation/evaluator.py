"""Collects validation embeddings and turns them into zero-shot and retrieval metrics."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from polymodal.evaluation.retrieval import retrieval_metrics
from polymodal.evaluation.zeroshot import (
    build_zeroshot_classifier,
    confusion_matrix,
    zeroshot_metrics,
)
from polymodal.utils.distributed import gather_objects, gather_variable, rank_and_world


def image_of(meta: Mapping, group_by: str | None, sample: object) -> tuple:
    """Which image a sample shows: its json `group_by` value (COCO's `image_id`) when it
    has one, else the sample itself (`sample`: its index or key)."""
    group = meta.get(group_by) if group_by else None
    return ("sample", sample) if group is None else ("group", str(group))


class EmbeddingEvaluator:
    """Zero-shot attribute classification + image/text retrieval on a held-out split.

    `templates` maps an attribute (a top-level key of each sample's `{key}.json`) to prompt
    templates; its class names come from `classes`, else from the `attributes` vocabulary
    in the dataset's `manifest.json`, else from the values the collected samples hold.
    Samples whose json lacks the attribute are not scored for it. `phrases` maps a class
    name to the words put into the templates (e.g. position "left" -> "on the left"); the
    class name is the default.
    """

    def __init__(
        self,
        templates: Mapping[str, Sequence[str]] | None = None,
        classes: Mapping[str, Sequence[str]] | None = None,
        phrases: Mapping[str, Mapping[str, str]] | None = None,
        manifest: str | None = None,
        retrieval: bool = True,
        retrieval_chunk_size: int = 1024,
        group_by: str | None = "image_id",
    ) -> None:
        self.templates = {k: list(v) for k, v in (templates or {}).items()}
        self._classes = {k: list(v) for k, v in (classes or {}).items()}
        self.phrases = {k: dict(v) for k, v in (phrases or {}).items()}
        self.manifest = manifest
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
        if attribute in self._classes:
            return self._classes[attribute]
        if self.manifest is None and self._meta:
            # the values the evaluated samples' json holds, sorted: any labelled shard set
            # works without a class list
            values = {m[attribute] for m in self._meta if isinstance(m.get(attribute), str | int)}
            return sorted(values, key=str)
        if self.manifest is None:
            raise ValueError(f"evaluation.classes.{attribute} is unset and no manifest is given")
        path = Path(self.manifest)
        if not path.exists():
            raise FileNotFoundError(f"evaluation.manifest not found: {path}")
        vocab = json.loads(path.read_text()).get("attributes", {})
        if attribute not in vocab:
            raise KeyError(f"attribute {attribute!r} not in {path} (has {sorted(vocab)})")
        self._classes[attribute] = list(vocab[attribute])
        return self._classes[attribute]

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
        index = {name: i for i, name in enumerate(self.classes(attribute))}
        metas = self._meta if samples is None else [self._meta[i] for i in samples.tolist()]
        return torch.tensor([index.get(m.get(attribute), -1) for m in metas])

    @torch.no_grad()
    def compute(self, encode_text: Callable[[list[str]], Tensor]) -> dict[str, float]:
        """Metrics named `zeroshot/<attr>_acc`, `zeroshot/mean_acc`, `retrieval/i2t_r1`, ...
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
        for attribute, templates in self.templates.items():
            labels = self.labels(attribute, first)
            if (labels >= 0).sum() == 0:
                continue
            phrases = self.phrases.get(attribute, {})
            classifier = build_zeroshot_classifier(
                lambda prompts: encode_text(prompts).float().cpu(),
                [phrases.get(name, name) for name in self.classes(attribute)],
                templates,
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
        return metrics
