"""What a validation pass reports beyond losses, for training and `polymodal-eval` alike:
zero-shot and retrieval (EmbeddingEvaluator), retrieval re-ranked by the model's ITM head,
generated captions scored against all of an image's captions, the text perplexity of a
language model, and media (confusion matrices, retrieval examples).

Each rank collects its share of the val set; `compute` gathers every rank's so each
metric covers the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polymodal.data.meta import IMAGE_ID
from polymodal.evaluation.captioning import caption_metrics, word_error_rate
from polymodal.evaluation.evaluator import EmbeddingEvaluator, image_of
from polymodal.evaluation.media import RetrievalExamples, retrieval_examples, write_media
from polymodal.evaluation.retrieval import reranked_recall_at_1
from polymodal.evaluation.zeroshot import ZeroShotTask
from polymodal.models.model import PolymodalModel
from polymodal.objectives.base import EncodingCache
from polymodal.objectives.lm import lm_logits, token_nll
from polymodal.utils.distributed import gather_objects, gather_variable, rank_and_world

Captioner = Callable[..., list[str]]  # (memory=tokens, **generation) -> captions


def write_evaluation_media(
    evaluator: EmbeddingEvaluator,
    images: Tensor | None,
    out_dir: Path,
    suffix: str,
    names: Sequence[str] | None = None,
    sounds: Tensor | None = None,
    sample_rate: int | None = None,
) -> tuple[dict[str, np.ndarray], RetrievalExamples | None]:
    """Confusion matrices of the evaluator's last `compute` and retrieval examples of the
    first `images` (preprocessed images or spectrograms, the first of the evaluated set;
    `sounds` the clips' waveforms) as PNG/CSV under `out_dir`; returns the pictures and
    examples for loggers."""
    examples = None
    if evaluator.retrieval and images is not None and len(images):
        image_emb, text_emb = evaluator.embeddings()
        examples = retrieval_examples(
            images, image_emb, text_emb, evaluator.captions, names, 5, sounds, sample_rate
        )
    confusion = {a: (m, evaluator.classes(a)) for a, m in evaluator.confusion.items()}
    return write_media(out_dir, suffix, confusion, examples), examples


class ValidationReport:
    """The metrics and samples of one validation pass of a model (see the module doc)."""

    def __init__(
        self,
        zeroshot: Mapping[str, ZeroShotTask] | None = None,
        retrieval: bool = True,
        retrieval_chunk_size: int = 1024,
        group_by: str | None = IMAGE_ID,
        media_samples: int = 8,
        itm_rerank_k: int = 16,
        caption_batches: int = 2,
        generation: Mapping | None = None,
        match_attributes: Sequence[str] = ("color", "shape"),
        wer: bool = False,
        perplexity: bool = False,
    ) -> None:
        self.evaluator = EmbeddingEvaluator(zeroshot, retrieval, retrieval_chunk_size, group_by)
        self.group_by = group_by
        self.media_samples, self.itm_rerank_k = media_samples, itm_rerank_k
        self.caption_batches = caption_batches
        self.generation = dict(generation or {})
        self.match_attributes, self.wer = tuple(match_attributes), wer
        self.perplexity = perplexity  # of the decoder without memory (a language model)
        self.reset()

    @property
    def class_names(self) -> dict[str, list[str]]:
        return {attribute: task.classes for attribute, task in self.evaluator.zeroshot.items()}

    def reset(self) -> None:
        self.evaluator.reset()
        # (image id, generated, its own caption, meta) of the captioned val samples
        self.captions: list[tuple[str, str, str, dict]] = []
        self._tokens: list[tuple[Tensor, Tensor, Tensor]] = []
        self.media_images: Tensor | None = None  # images or spectrograms
        self.media_sounds: Tensor | None = None  # the clips' waveforms
        self._nll = [0.0, 0]  # summed token NLL and tokens, for the perplexity

    def update(
        self, cache: EncodingCache, batch_idx: int, captioner: Captioner | None = None
    ) -> None:
        """Add one val batch: its embeddings, (with an ITM head) its tokens, (with a
        decoder, in the first `caption_batches`) captions of its images; with
        `perplexity`, its texts' log-likelihood (all a model of text alone gets)."""
        model, batch = cache.model, cache.batch
        if self.perplexity:
            nll, count = token_nll(lm_logits(cache), batch["text_ids"], batch["text_mask"])
            self._nll = [self._nll[0] + nll, self._nll[1] + count]  # no host sync per batch
        if model.paired_modality == "text":  # a model of text alone: nothing to pair
            return
        modality = cache.paired_modality
        self.evaluator.update(
            cache.embedding(modality), cache.embedding("text"), batch["meta"], batch["text"]
        )
        if batch_idx == 0:  # rank 0's first samples lead the gathered val set
            inputs = batch[model.input_key(modality)]
            self.media_images = inputs[: self.media_samples].detach().cpu()
            if "waveform" in batch:
                self.media_sounds = batch["waveform"][: self.media_samples].cpu()
        # a set whose samples lack the fusion/decoder memory (sounds, in a mix whose
        # fusion attends to images) gets no re-ranking and no captions
        reranks = model.itm_head is not None and cache.holds(model.fusion_memory)
        if reranks and self.itm_rerank_k > 0:
            memory = cache.tokens(model.fusion_memory)
            tokens = (memory, cache.tokens("text"), cache.mask("text"))
            self._tokens.append(tuple(t.detach() for t in tokens))
        decodes = model.decoder is not None and cache.holds(model.decoder_memory)
        if captioner is not None and decodes and batch_idx < self.caption_batches:
            memory = cache.tokens(model.decoder_memory)
            generated = captioner(memory=memory, **self.generation)
            for text, caption, meta, key in zip(
                generated, batch["text"], batch["meta"], batch["key"], strict=True
            ):
                image = str(image_of(meta, self.group_by, key))
                self.captions.append((image, text, caption, meta))

    def compute(
        self, model: PolymodalModel, encode_prompts: Callable[[list[str]], Tensor]
    ) -> dict[str, float]:
        """Every metric over the whole val set (a collective under DDP: all ranks call)."""
        device = next(model.parameters()).device
        if model.paired_modality != "text":  # a model of text alone collects no embeddings
            self.evaluator.gather(device)
        self.captions = gather_objects(self.captions)
        metrics = self.evaluator.compute(encode_prompts)
        if self.perplexity:
            sums = gather_objects([(float(self._nll[0]), int(self._nll[1]))])
            nll = sum(s for s, _ in sums) / max(1, sum(c for _, c in sums))
            metrics.update({"lm/nll": nll, "lm/perplexity": float(np.exp(nll))})
        tokens = self._gathered_tokens()
        if tokens:
            metrics.update(self.itm_rerank_metrics(model, *tokens))
        if self.captions:
            metrics.update(self.caption_metrics())
        return metrics

    def _gathered_tokens(self) -> tuple[Tensor, Tensor, Tensor] | None:
        if not self._tokens:
            return None
        tokens = tuple(torch.cat(t) for t in zip(*self._tokens, strict=True))
        if rank_and_world()[1] > 1:
            tokens = tuple(gather_variable(t) for t in tokens)
        return tokens

    @torch.no_grad()
    def itm_rerank_metrics(
        self,
        model: PolymodalModel,
        image_tokens: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        chunk_size: int = 512,
    ) -> dict[str, float]:
        """Retrieval R@1 with each query's ITC top-k re-ranked by the model's ITM head."""
        device = image_tokens.device
        image_emb, text_emb = (e.to(device) for e in self.evaluator.embeddings())
        first, sample_to_image = (t.to(device) for t in self.evaluator.image_groups())
        image_emb, image_tokens = image_emb[first], image_tokens[first]  # one per image

        def score(image_index: Tensor, text_index: Tensor) -> Tensor:
            scores = []
            for start in range(0, len(image_index), chunk_size):
                i = image_index[start : start + chunk_size]
                t = text_index[start : start + chunk_size]
                logits = model.match_logits(text_tokens[t], text_mask[t], image_tokens[i])
                scores.append(logits.softmax(dim=-1)[:, 1])
            return torch.cat(scores)

        result = reranked_recall_at_1(
            image_emb, text_emb, sample_to_image, score, k=self.itm_rerank_k
        )
        return {f"retrieval/{k}": v for k, v in result.items()}

    def caption_references(self) -> dict[str, list[str]]:
        """All val captions of each captioned image (samples sharing its `group_by`)."""
        wanted = {image for image, *_ in self.captions}
        references: dict[str, list[str]] = {image: [] for image in wanted}
        for meta, caption in zip(self.evaluator.metas, self.evaluator.captions, strict=True):
            group = image_of(meta, self.group_by, None)
            if group[0] == "group" and str(group) in wanted:
                references[str(group)].append(caption)
        for image, _, caption, _ in self.captions:  # images without a group: their caption
            if not references[image]:
                references[image].append(caption)
        return references

    def caption_metrics(self) -> dict[str, float]:
        """`caption/bleu1|bleu4|cider|attribute_match` of the first caption generated for
        each image, against all of its captions; with `wer`, `caption/wer` of every
        generated text against its sample's own (a transcript)."""
        generated, metas = {}, {}
        for image, text, _, meta in self.captions:
            generated.setdefault(image, text)
            metas.setdefault(image, meta)
        scores = caption_metrics(generated, self.caption_references(), metas, self.match_attributes)
        if self.wer:
            hypotheses = [text for _, text, _, _ in self.captions]
            scores["wer"] = word_error_rate(hypotheses, [own for _, _, own, _ in self.captions])
        return {f"caption/{k}": v for k, v in scores.items()}

    def caption_rows(self, count: int = 16) -> list[list[str]]:
        """[generated, reference] of the first `count` captioned samples."""
        return [[text, caption] for _, text, caption, _ in self.captions[:count]]
