"""`polymodal.load(ckpt)`: a trained checkpoint as a plain Python object.

Checkpoints written by `polymodal-train` carry the resolved run config and the tokenizer
(`checkpoint["polymodal"]`), so loading needs no config files and no dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import Tensor

from polymodal.data.audio import AudioClips
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

Clips = Sequence[str | Path | bytes | np.ndarray] | Tensor


class Polymodal:
    """Encoders, zero-shot classifier and caption generator of one trained checkpoint.

    `transform` (PIL image -> tensor), `audio` (clip -> spectrogram) and `tokenizer` are
    the ones the model was trained with, in their evaluation form (images: resize +
    centre crop + CLIP normalisation; clips: the first `data.audio.seconds`, no masking).
    `modality` is what the checkpoint's texts describe: its first modality besides text
    (image or audio); shard tools and `zero_shot` work on it.
    """

    def __init__(self, module: PretrainModule, config: dict, tokenizer: TextTokenizer) -> None:
        self.module = module.eval()
        self.config = config
        self.tokenizer = tokenizer
        self.transform = image_transform(config["data"]["image_size"], train=False)
        modalities = self.module.model.modalities
        self.modality = next((m for m in modalities if m != "text"), "image")
        self.audio = None
        if "audio" in modalities:
            self.audio = AudioClips(False, **config["data"]["audio"])

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

    def preprocess_audio(self, clips: Clips) -> Tensor:
        """Spectrograms [N, 1, mels, frames] from audio files, their bytes, or mono waveforms
        at `data.audio.sample_rate` (or an already preprocessed tensor)."""
        if self.audio is None:
            raise ConfigError(
                f"this checkpoint has no audio encoder ({self.module.model.modalities})"
            )
        if isinstance(clips, Tensor):
            return clips.to(self.device)
        waves = []
        for clip in clips:
            if isinstance(clip, np.ndarray):
                waves.append(self.audio.fit(torch.from_numpy(clip.astype(np.float32))))
            else:
                data = Path(clip).read_bytes() if isinstance(clip, (str, Path)) else clip
                waves.append(self.audio.read(data))
        return self.audio.features(torch.stack(waves)).to(self.device)

    @torch.no_grad()
    def encode_audio(self, clips: Clips) -> Tensor:
        """L2-normalised audio embeddings [N, D]."""
        return self.module.model.embed("audio", self.preprocess_audio(clips))

    def encode(self, inputs) -> Tensor:
        """Embeddings of images or clips, whichever this checkpoint's `modality` is."""
        return self.encode_audio(inputs) if self.modality == "audio" else self.encode_image(inputs)

    def batch_input(self, samples: Sequence[dict]) -> Tensor:
        """The model input of decoded shard samples (`read_shards`) of `modality`."""
        stacked = torch.stack([s[self.modality] for s in samples])
        if self.modality == "audio":
            return self.audio.features(stacked).to(self.device)
        return stacked.to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings [N, D]."""
        ids, mask = self.tokenizer.encode(list(texts))
        return self.module.model.embed("text", ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def zero_shot(
        self,
        inputs: Sequence[Image.Image] | Clips,
        class_names: Sequence[str],
        templates: Sequence[str] = ("{}",),
    ) -> Tensor:
        """Class probabilities [N, C] of images or clips (the checkpoint's `modality`):
        each class is the mean of its normalised prompt
        embeddings (CLIP's prompt ensemble), scored at the learned temperature (100 for a
        model trained without one). With a SigLIP bias the classes are independent
        sigmoids (SigLIP's zero-shot), else a softmax over classes."""
        classifier = build_zeroshot_classifier(self.encode_text, class_names, templates)
        logits = self.encode(inputs).float() @ classifier.to(self.device).T
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
        """Decoded samples {image (preprocessed) or audio (waveform), text, key, meta} of a
        shard set, in shard order. Bad samples are skipped (as in training) and their
        errors appended to `skipped`, so callers can count them."""
        decoder = SampleDecoder(
            self.transform,
            image_keys,
            text_keys,
            modalities=(self.modality, "text"),
            audio=self.audio,
        )
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
        {keys, <modality> [N, D], text [N, D], captions, meta, skipped, images, sounds}.
        `images` holds the model inputs of the first `keep_images` samples (preprocessed
        images or spectrograms, for pictures of the results), `sounds` their waveforms
        (audio checkpoints). A terminal shows a progress bar (samples, from the shards'
        sizes.json)."""
        skipped: list[str] = []
        keys, captions, metas, embedded, texts, kept, batch = [], [], [], [], [], [], []
        urls = expand_shards(shards, "shards")
        model = self.module.model

        def flush() -> None:
            embedded.append(model.embed(self.modality, self.batch_input(batch)).cpu())
            texts.append(self.encode_text([s["text"] for s in batch]).cpu())
            advance(len(batch))
            batch.clear()

        with progress_bar("embedding", _sample_count(urls)) as advance:
            for sample in self.read_shards(urls, skipped, image_keys, text_keys):
                keys.append(sample["key"])
                captions.append(sample["text"])
                metas.append(sample["meta"])
                if len(kept) < keep_images:
                    kept.append(sample)
                batch.append(sample)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        if not keys:
            raise ConfigError(f"shards {shards!r}: no usable sample ({len(skipped)} skipped)")
        return {
            "keys": keys,
            self.modality: torch.cat(embedded),
            "text": torch.cat(texts),
            "captions": captions,
            "meta": metas,
            "skipped": skipped,
            "images": self.batch_input(kept).cpu() if kept else torch.empty(0),
            "sounds": torch.stack([s["audio"] for s in kept]) if self.audio and kept else None,
        }

    def generate(
        self,
        images: Sequence[Image.Image] | Tensor | None = None,
        audio: Clips | None = None,
        **kwargs,
    ) -> list[str]:
        """Captions of images or clips (for checkpoints with a decoder, which attends to
        `model.decoder.memory`); kwargs as `PretrainModule.generate`."""
        model = self.module.model
        if (images is None) == (audio is None):
            raise ValueError("generate: pass images or audio")
        given = "image" if audio is None else "audio"
        if model.decoder is not None and model.decoder_memory != given:
            raise ConfigError(
                f"this checkpoint's decoder attends to {model.decoder_memory}, not {given}"
            )
        inputs = self.preprocess(images) if audio is None else self.preprocess_audio(audio)
        memory = model.encode(given, inputs)
        return self.module.generate(memory=memory, **kwargs)

    def transcribe(self, clips: Clips, **kwargs) -> list[str]:
        """Transcripts of speech clips (a speech-recognition checkpoint, e.g.
        experiment=asr_spoken); kwargs as `PretrainModule.generate` (strategy, num_beams)."""
        return self.generate(audio=clips, **kwargs)


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
