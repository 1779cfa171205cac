"""`polymodal.load(ckpt)`: a trained checkpoint as a plain Python object.

Checkpoints written by `polymodal-train` carry the resolved run config and the tokenizer
(`checkpoint["polymodal"]`), so loading needs no config files and no dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import Tensor

from polymodal.data.audio import MAX_CHANNELS, AudioClips, resample
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
from polymodal.objectives.lm import LMObjective
from polymodal.tasks.pretrain import PretrainModule
from polymodal.utils.checkpoint import check_targets, read_checkpoint
from polymodal.utils.cli import interactive, progress_bar
from polymodal.utils.errors import ConfigError, SkippedSample

log = logging.getLogger(__name__)

Clips = Sequence[str | Path | bytes | np.ndarray | Tensor] | Tensor


class Polymodal:
    """Encoders, zero-shot classifier and caption generator of one trained checkpoint.

    `transform` (PIL image -> tensor), `audio` (clip -> spectrogram) and `tokenizer` are
    the ones the model was trained with, in their evaluation form (images: resize +
    centre crop + CLIP normalisation; clips: the first `data.audio.seconds`, no masking).
    `modality` is what the checkpoint's texts describe: its first modality besides text
    (image or audio); shard tools and `zero_shot` work on it. A checkpoint of several
    (`experiment=trimodal`) switches with `model.modality = "audio"`.
    """

    def __init__(
        self,
        module: PretrainModule,
        config: dict,
        tokenizer: TextTokenizer,
        classifier: dict | None = None,
    ) -> None:
        self.module = module.eval()
        self.config = config
        self.tokenizer = tokenizer
        # a fine-tuned classifier head's json attribute and class names (task=classify)
        self.classifier = classifier
        data = config["data"]
        self.transform = image_transform(
            data["image_size"], train=False, interpolation=data.get("interpolation", "bilinear")
        )
        modalities = self.module.model.modalities
        self._modality = self.module.model.paired_modality
        self.audio = None
        if "audio" in modalities:
            self.audio = AudioClips(False, **config["data"]["audio"])

    @property
    def modality(self) -> str:
        return self._modality

    @modality.setter
    def modality(self, modality: str) -> None:
        choices = [m for m in self.module.model.modalities if m != "text"]
        if modality not in choices:
            raise ConfigError(f"modality: {modality!r} is not one of this checkpoint's {choices}")
        self._modality = modality

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

    def preprocess_audio(self, clips: Clips, sample_rate: int | None = None) -> Tensor:
        """Spectrograms [N, 1, mels, frames] as the model saw them in evaluation.

        `clips` is a list of audio files or their bytes (decoded by libsndfile) or of
        waveforms at `sample_rate` (None: the checkpoint's `data.audio.sample_rate`; others
        are resampled to it): 1-D arrays or tensors, or [samples, channels] arrays (as
        soundfile reads them; mixed down). Or one tensor: [N, samples] mono waveforms, or
        [N, 1, mels, frames] spectrograms already preprocessed (used as they are).
        Only the first `data.audio.seconds` of each clip is used (the window the checkpoint
        was trained on): files are decoded only that far, longer waveforms are cut with a
        warning. A clip that cannot be used raises a ValueError naming it.
        """
        if self.audio is None:
            raise ConfigError(
                f"this checkpoint has no audio encoder ({self.module.model.modalities})"
            )
        if isinstance(clips, Tensor):
            if clips.dim() == 4:
                return clips.to(self.device)
            if clips.dim() != 2:
                raise ValueError(
                    f"audio tensor of shape {tuple(clips.shape)}: expected waveforms "
                    "[N, samples] or spectrograms [N, 1, mels, frames]"
                )
            clips = list(clips)
        elif isinstance(clips, (str, Path, bytes, np.ndarray)):
            raise ValueError(
                f"clips: expected a list of clips, got one {type(clips).__name__} (pass [clip])"
            )
        if len(clips) == 0:
            raise ValueError("no audio clips given")
        rate = self.audio.sample_rate if sample_rate is None else sample_rate
        waves, cut = [], 0
        for index, clip in enumerate(clips):
            if isinstance(clip, (str, Path, bytes)):
                waves.append(self._read_clip(clip, index))
            else:
                wave = self._waveform(clip, index, rate)
                cut += len(wave) > self.audio.length
                waves.append(self.audio.fit(torch.from_numpy(wave)))
        if cut:
            seconds = self.audio.length / self.audio.sample_rate
            log.warning(
                "%d of %d audio clips are longer than the checkpoint's data.audio.seconds "
                "(%g s, the window it was trained on): only their first %g s are used",
                cut,
                len(waves),
                seconds,
                seconds,
            )
        return self.audio.features(torch.stack(waves)).to(self.device)

    def _read_clip(self, clip: str | Path | bytes, index: int) -> Tensor:
        """The waveform [length] of an encoded clip; a bad one is named (SkippedSample, as
        the data pipeline raises it, names no file)."""
        data = clip if isinstance(clip, bytes) else Path(clip).read_bytes()
        try:
            return self.audio.read(data)
        except SkippedSample as err:
            name = f"clip {index} (bytes)" if isinstance(clip, bytes) else f"file {clip}"
            raise ValueError(f"cannot read audio {name}: {err.detail}") from err

    def _waveform(self, clip: np.ndarray | Tensor, index: int, rate: int) -> np.ndarray:
        """A given waveform at `rate` -> mono float32 at the checkpoint's rate, uncropped.
        Integer samples are refused: their scale (e.g. int16 PCM) would silently shift
        every log-mel value."""
        if isinstance(clip, Tensor):
            if clip.dim() != 1:  # torchaudio's [channels, samples] is not soundfile's order
                raise ValueError(
                    f"audio clip {index}: a waveform tensor must be 1-D (mono), got shape "
                    f"{tuple(clip.shape)}"
                )
            clip = clip.detach().float().cpu().numpy()
        wave = np.asarray(clip)
        if not np.issubdtype(wave.dtype, np.floating):
            raise ValueError(f"audio clip {index}: expected float samples, got {wave.dtype}")
        if wave.ndim == 2 and 1 <= wave.shape[1] <= MAX_CHANNELS:
            wave = wave.mean(axis=1)
        if wave.ndim != 1:
            raise ValueError(
                f"audio clip {index}: expected a waveform [samples] or [samples, channels], "
                f"got shape {wave.shape}"
            )
        if wave.size == 0:
            raise ValueError(f"audio clip {index}: empty waveform (no samples)")
        return resample(wave.astype(np.float32), rate, self.audio.sample_rate)

    @torch.no_grad()
    def encode_audio(self, clips: Clips, sample_rate: int | None = None) -> Tensor:
        """L2-normalised audio embeddings [N, D] of the first `data.audio.seconds` of each
        clip (the checkpoint's window; `preprocess_audio` says what clips can be)."""
        return self.module.model.embed("audio", self.preprocess_audio(clips, sample_rate))

    def encode(self, inputs: Sequence[Image.Image] | Clips) -> Tensor:
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
        images: Sequence[Image.Image] | Clips,
        class_names: Sequence[str],
        templates: Sequence[str] = ("{}",),
    ) -> Tensor:
        """Class probabilities [N, C] of `images`, which are images or clips, whichever the
        checkpoint's `modality` is (the name stays `images` for callers that pass it by
        keyword): each class is the mean of its normalised prompt
        embeddings (CLIP's prompt ensemble), scored at the learned temperature (100 for a
        model trained without one). With a SigLIP bias the classes are independent
        sigmoids (SigLIP's zero-shot), else a softmax over classes."""
        classifier = build_zeroshot_classifier(self.encode_text, class_names, templates)
        logits = self.encode(images).float() @ classifier.to(self.device).T
        model = self.module.model
        if model.logit_scale is None:
            return (100.0 * logits).softmax(dim=-1)
        scale, bias = model.contrastive_scale()
        if bias is not None:
            return torch.sigmoid(scale * logits + bias)
        return (scale * logits).softmax(dim=-1)

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image] | Clips) -> Tensor:
        """Class probabilities [N, C] of images (or clips) by the checkpoint's fine-tuned
        classifier head; `classifier["classes"]` names the columns."""
        if self.classifier is None:
            raise ConfigError(
                "this checkpoint has no classifier head: fine-tune one with task=classify "
                "(e.g. experiment=finetune_digits)"
            )
        return self.module.model.classify(self.encode(images)).float().softmax(dim=-1)

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
            "sounds": torch.stack([s["audio"] for s in kept])
            if self.modality == "audio" and kept
            else None,
        }

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Image.Image] | Tensor | None = None,
        audio: Clips | None = None,
        sample_rate: int | None = None,
        **kwargs,
    ) -> list[str]:
        """Captions of images or clips (for checkpoints with a decoder, which attends to
        `model.decoder.memory`); `audio` and `sample_rate` as in `preprocess_audio` (only
        the first `data.audio.seconds` of a clip is heard); kwargs as
        `PretrainModule.generate`. Without gradients: the encoder's graph would otherwise
        be kept in memory for the whole decoding."""
        model = self.module.model
        if (images is None) == (audio is None):
            raise ValueError("generate: pass images or audio")
        given = "image" if audio is None else "audio"
        if model.decoder is not None and model.decoder_memory is None:
            raise ConfigError("this checkpoint is a language model of text: use complete()")
        if model.decoder is not None and model.decoder_memory != given:
            raise ConfigError(
                f"this checkpoint's decoder attends to {model.decoder_memory}, not {given}"
            )
        if audio is None:
            inputs = self.preprocess(images)
        else:
            inputs = self.preprocess_audio(audio, sample_rate)
        memory = model.encode(given, inputs)
        return self.module.generate(memory=memory, **kwargs)

    @torch.no_grad()
    def complete(self, prompts: Sequence[str], **kwargs) -> list[str]:
        """Each prompt continued by the decoder alone (a checkpoint trained with the `lm`
        objective, e.g. experiment=lm_shapes), prompt included: "a red" -> "a red circle".
        kwargs as `PretrainModule.generate` (strategy, top_k, max_length counting the
        prompt's tokens, ...). Prompts of one token length decode together."""
        if isinstance(prompts, str):
            raise TypeError("complete takes a list of prompts, not one string")
        if not any(isinstance(o, LMObjective) for o in self.module.objectives.values()):
            raise ConfigError(
                "this checkpoint's decoder was not trained on text alone (task.objectives.lm): "
                "it would continue prompts at random"
            )
        context = self.module.model.decoder.context_length
        prefixes = []
        for prompt in prompts:
            prefixes.append(self.tokenizer.prompt_ids(prompt))
            if len(prefixes[-1]) > context:
                raise ValueError(f"prompt {prompt!r} fills the {context}-token context")
        out: list[str] = [""] * len(prompts)
        for length in sorted({len(p) for p in prefixes}):
            rows = [i for i, p in enumerate(prefixes) if len(p) == length]
            prefix = torch.tensor([prefixes[i] for i in rows], device=self.device)
            for i, text in zip(rows, self.module.generate(prefix=prefix, **kwargs), strict=True):
                out[i] = text
        return out

    def transcribe(self, clips: Clips, sample_rate: int | None = None, **kwargs) -> list[str]:
        """Transcripts of speech clips (a speech-recognition checkpoint, e.g.
        experiment=asr_spoken); clips and `sample_rate` as in `preprocess_audio`. Only the
        first `data.audio.seconds` of each clip (the checkpoint's window, 3 s for
        asr_spoken) is transcribed: split longer speech first. kwargs as
        `PretrainModule.generate` (strategy, num_beams)."""
        return self.generate(audio=clips, sample_rate=sample_rate, **kwargs)


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
    classifier = stored.get("classifier")
    if classifier is not None and not (
        isinstance(classifier, dict)
        and isinstance(classifier.get("attribute"), str)
        and isinstance(classifier.get("classes"), list)
        and all(isinstance(name, str) for name in classifier["classes"])
        and module.model.classifier is not None
        and len(classifier["classes"]) == module.model.classifier.out_features
    ):
        raise ConfigError(f"{path}: polymodal.classifier is not the head's attribute and classes")
    return Polymodal(module, config, tokenizer, classifier).to(device)
