"""`polymodal.load(ckpt)`: a trained checkpoint as a plain Python object.

Checkpoints written by `polymodal-train` carry the resolved run config and the tokenizer
(`checkpoint["polymodal"]`), so loading needs no config files and no dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from PIL import Image
from torch import Tensor

from polymodal.data.shards import (
    IMAGE_KEYS,
    TEXT_KEYS,
    SampleDecoder,
    SkipPolicy,
    decoded_samples,
    expand_shards,
    shard_sizes,
)
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.evaluation.zeroshot import build_zeroshot_classifier
from polymodal.tasks.pretrain import PretrainModule
from polymodal.utils.checkpoint import check_targets, read_checkpoint
from polymodal.utils.cli import interactive, progress_bar
from polymodal.utils.errors import ConfigError


class Polymodal:
    """Encoders, zero-shot classifier and caption generator of one trained checkpoint.

    `transform` (PIL image -> tensor) and `tokenizer` are the ones the model was trained
    with (the evaluation transform: resize + centre crop + CLIP normalisation).
    """

    def __init__(self, module: PretrainModule, config: dict, tokenizer: TextTokenizer) -> None:
        self.module = module.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.transform = image_transform(config["data"]["image_size"], train=False)

    @property
    def device(self) -> torch.device:
        return self.module.device

    def to(self, device: str | torch.device) -> Polymodal:
        self.module.to(device)
        return self

    def preprocess(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        """A batch tensor from PIL images (or an already preprocessed tensor)."""
        if isinstance(images, Tensor):
            return images.to(self.device)
        batch = [self.transform(image.convert("RGB")) for image in images]
        return torch.stack(batch).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        """L2-normalised image embeddings [N, D]."""
        return self.module.model.embed("image", self.preprocess(images))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings [N, D]."""
        ids, mask = self.tokenizer.encode(list(texts))
        return self.module.model.embed("text", ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def zero_shot(
        self,
        images: Sequence[Image.Image] | Tensor,
        class_names: Sequence[str],
        templates: Sequence[str] = ("{}",),
    ) -> Tensor:
        """Class probabilities [N, C]: each class is the mean of its normalised prompt
        embeddings (CLIP's prompt ensemble), scored at the learned temperature (100 for a
        model trained without one). With a SigLIP bias the classes are independent
        sigmoids (SigLIP's zero-shot), else a softmax over classes."""
        classifier = build_zeroshot_classifier(self.encode_text, class_names, templates)
        logits = self.encode_image(images).float() @ classifier.to(self.device).T
        model = self.module.model
        if model.logit_scale is None:
            return (100.0 * logits).softmax(dim=-1)
        scale, bias = model.contrastive_scale()
        if bias is not None:
            return torch.sigmoid(scale * logits + bias)
        return (scale * logits).softmax(dim=-1)

    def read_shards(
        self,
        shards: str | Sequence[str],
        skipped: list[str],
        image_keys: Sequence[str] = IMAGE_KEYS,
        text_keys: Sequence[str] = TEXT_KEYS,
    ) -> Iterator[dict]:
        """Decoded samples {image (preprocessed), text, key, meta} of a shard set, in shard
        order. Bad samples are skipped (as in training) and their errors appended to
        `skipped`, so callers can count them."""
        decoder = SampleDecoder(self.transform, image_keys, text_keys)
        skips = SkipPolicy(quiet=True, record=lambda exc: skipped.append(str(exc)))
        yield from decoded_samples(expand_shards(shards, "shards"), decoder, skips)

    @torch.no_grad()
    def embed_shards(
        self,
        shards: str | Sequence[str],
        batch_size: int = 256,
        image_keys: Sequence[str] = IMAGE_KEYS,
        text_keys: Sequence[str] = TEXT_KEYS,
        keep_images: int = 0,
    ) -> dict:
        """Embeddings of every usable sample of a shard set, in shard order:
        {keys, image [N, D], text [N, D], captions, meta, skipped, images}. `images` holds
        the first `keep_images` preprocessed images (for pictures of the results). A
        terminal shows a progress bar (samples, from the shards' sizes.json)."""
        skipped: list[str] = []
        keys, captions, metas, images, texts, kept, batch = [], [], [], [], [], [], []
        urls = expand_shards(shards, "shards")

        def flush() -> None:
            images.append(self.encode_image(torch.stack([s["image"] for s in batch])).cpu())
            texts.append(self.encode_text([s["text"] for s in batch]).cpu())
            advance(len(batch))
            batch.clear()

        with progress_bar("embedding", _sample_count(urls)) as advance:
            for sample in self.read_shards(urls, skipped, image_keys, text_keys):
                keys.append(sample["key"])
                captions.append(sample["text"])
                metas.append(sample["meta"])
                if len(kept) < keep_images:
                    kept.append(sample["image"])
                batch.append(sample)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        if not keys:
            raise ConfigError(f"shards {shards!r}: no usable sample ({len(skipped)} skipped)")
        return {
            "keys": keys,
            "image": torch.cat(images),
            "text": torch.cat(texts),
            "captions": captions,
            "meta": metas,
            "skipped": skipped,
            "images": torch.stack(kept) if kept else torch.empty(0),
        }

    def generate(self, images: Sequence[Image.Image] | Tensor, **kwargs) -> list[str]:
        """Captions (for checkpoints with a decoder); kwargs as `PretrainModule.generate`."""
        return self.module.generate(self.preprocess(images), **kwargs)


def _sample_count(urls: Sequence[str]) -> int | None:
    """The progress bar's total: None when no bar is shown (counting shards without a
    sizes.json reads their tar headers) or when remote shards have no count."""
    if not interactive():
        return None
    try:
        return sum(shard_sizes(urls, "shards"))
    except ConfigError:
        return None


def load(path: str | Path, device: str | torch.device = "cpu") -> Polymodal:
    """Rebuild the model of a `polymodal-train` checkpoint (no config files needed).

    Safe for a file from elsewhere: it is unpickled with weights_only, and the model and
    task configs it carries are checked (every `_target_`) before anything is built, so
    opening it runs no code of its choosing; a refused file raises a one-line ConfigError.
    """
    checkpoint = read_checkpoint(path)
    stored = checkpoint.get("polymodal")
    if not isinstance(stored, dict):
        raise ConfigError(f"{path}: not a polymodal checkpoint (no 'polymodal' entry)")
    missing = [k for k in ("config", "tokenizer") if k not in stored]
    missing += [
        f"config.{k}" for k in ("model", "task", "data") if k not in stored.get("config", {})
    ]
    missing += ["state_dict"] if "state_dict" not in checkpoint else []
    if missing:
        raise ConfigError(f"{path}: not a complete polymodal checkpoint (no {', '.join(missing)})")
    config = stored["config"]
    if str(config["model"].get("_target_", "")).endswith(".Backbone"):
        raise ConfigError(
            f"{path}: written by polymodal before the model owned its heads (model "
            "Backbone); this version cannot rebuild it: retrain, or load it with the "
            "polymodal release that wrote it"
        )
    try:
        for field in ("model", "task"):
            check_targets(config[field], field)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    module = instantiate(config["task"], model=instantiate(config["model"]))
    tokenizer = TextTokenizer.from_state(stored["tokenizer"])
    module.tokenizer = tokenizer
    module.load_state_dict(checkpoint["state_dict"])
    return Polymodal(module, config, tokenizer).to(device)
