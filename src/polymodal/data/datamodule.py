"""Streaming image-text DataModule over webdataset tar shards.

Shards are found, counted and decoded by `polymodal.data.shards`; each rank's and each
worker's exact, resumable share of an epoch is `polymodal.data.stream.ShardedSamples`.
Rank and world size come from the trainer, never from environment guessing, so
spawn/forkserver workers split correctly too. Decoding, augmentation, tokenisation and
batching all happen inside the loader workers.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
import webdataset as wds

from polymodal.data.audio import AudioClips
from polymodal.data.shards import (
    DEFAULT_MAX_CAPTION_BYTES,
    DEFAULT_MAX_PIXELS,
    IMAGE_KEYS,
    TEXT_KEYS,
    KeySplitter,
    SampleDecoder,
    SkipPolicy,
    decoded_samples,
    expand_shards,
    shard_sizes,
)
from polymodal.data.stream import ShardedSamples, split_range
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.utils.errors import ConfigError

log = logging.getLogger(__name__)


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


def ignore_job_signals(worker_id: int) -> None:
    """Loader workers ignore SIGUSR1/SIGUSR2 and leave with exit code 0 on SIGTERM.

    SLURM delivers a job's warning signal, and a requeue's SIGTERM, to every process of
    the step. A worker killed by a signal makes torch raise "worker exited unexpectedly"
    in the training process, which would replace the clean exit of a preempted run (see
    utils.callbacks.Preemption); a worker that ignored SIGTERM would instead hang the
    training process's exit, which stops its daemonic children with SIGTERM."""
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


class TokenizingCollate:
    """Stacks images, turns clips into spectrograms and tokenises captions (in the worker,
    not the training loop). A batch holds the modalities its samples hold."""

    def __init__(self, tokenizer: TextTokenizer, audio: AudioClips | None = None) -> None:
        self.tokenizer, self.audio = tokenizer, audio

    def __call__(self, samples: list[dict]) -> dict:
        batch = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
        if "image" in samples[0]:
            batch["image"] = torch.stack([s["image"] for s in samples])
        if "audio" in samples[0]:
            waves = torch.stack([s["audio"] for s in samples])
            batch["audio"] = self.audio.features(waves)
            if not self.audio.train:  # evaluation keeps the clips, for media (players)
                batch["waveform"] = waves
        if "text" in samples[0]:
            texts = [s["text"] for s in samples]
            batch["text_ids"], batch["text_mask"] = self.tokenizer.encode(texts)
            batch["text"] = texts
        return batch


class WebDataModule(L.LightningDataModule):
    """Shards -> batches {image, audio, text_ids, text_mask, text, key, meta, skipped}
    holding `modalities` (each sample must have all of them).

    `zeroshot` describes how the val split is scored zero-shot (see EmbeddingEvaluator);
    it lives with the data because the labels and class names belong to the dataset.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None,
        tokenizer: str,
        special_tokens: Mapping[str, str | None] | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        image_size: int = 64,
        context_length: int = 32,
        crop_scale: Sequence[float] = (0.8, 1.0),
        hflip: bool = False,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        train_samples: int | None = None,
        seed: int = 0,
        strict: bool = False,
        image_keys: Sequence[str] = IMAGE_KEYS,
        text_keys: Sequence[str] = TEXT_KEYS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
        prepare: Callable[[], object] | None = None,
        zeroshot: Mapping | None = None,
        worker_start_method: str | None = None,
        modalities: Sequence[str] = ("image", "text"),
        audio: Mapping | None = None,
    ) -> None:
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.tokenizer_path, self.context_length = tokenizer, context_length
        self.special_tokens = special_tokens
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size, self.crop_scale, self.hflip = image_size, crop_scale, hflip
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.train_samples, self.seed, self.strict = train_samples, seed, strict
        self.image_keys, self.text_keys = image_keys, text_keys
        self.max_pixels, self.max_caption_bytes = max_pixels, max_caption_bytes
        self.prepare = prepare
        self.zeroshot = zeroshot
        self.worker_start_method = worker_start_method
        self.modalities, self.audio = tuple(modalities), dict(audio or {})
        if "audio" in self.modalities:
            self.audio_clips(train=True)  # a bad data.audio setting fails now, in one line
        self.counts: dict[tuple[str, ...], list[int]] = {}  # shard list -> sizes, read once
        self.tokenizer: TextTokenizer | None = None
        # the training stream's position: the last trained batch of each loader worker
        self.position: dict = {}
        self.resume: dict = {}  # a checkpoint's position, applied by train_dataloader

    def prepare_data(self) -> None:
        """Generate built-in data (e.g. the shapes dataset) if the config asks for it."""
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            try:
                self.tokenizer = TextTokenizer(
                    self.tokenizer_path, self.context_length, self.special_tokens
                )
            except FileNotFoundError as err:
                raise ConfigError(f"data.tokenizer: {err}") from err
        if stage in ("fit", None):
            self.check_usable(expand_shards(self.train_shards, "data.train_shards"), "train")

    def check_usable(self, urls: Sequence[str], split: str) -> None:
        """Fail before training, in one line, when no shard holds a usable sample. Reads the
        shards in order until one sample decodes, so a healthy set costs one sample."""
        skips = SkipPolicy(quiet=True)
        for _ in decoded_samples(urls, self.decoder(train=False), skips):
            return
        first = f" (first problem: {skips.first})" if skips.first else " (all empty)"
        raise ConfigError(f"data.{split}_shards: no usable sample in {len(urls)} shard(s){first}")

    def shard_sizes(self, urls: Sequence[str], field: str) -> list[int]:
        """Per-shard sample counts (`shard_sizes`), looked up once per shard list: shards
        without a sizes.json are counted only the first time."""
        key = tuple(urls)
        if key not in self.counts:
            split_key = KeySplitter(self.decoder(train=False).extensions)
            self.counts[key] = shard_sizes(urls, field, split_key)
        return self.counts[key]

    def decoder(self, train: bool) -> SampleDecoder:
        return SampleDecoder(
            image_transform(self.image_size, train, self.crop_scale, self.hflip),
            self.image_keys,
            self.text_keys,
            max_pixels=self.max_pixels,
            max_caption_bytes=self.max_caption_bytes,
            modalities=self.modalities,
            audio=self.audio_clips(train) if "audio" in self.modalities else None,
        )

    def audio_clips(self, train: bool) -> AudioClips:
        """The audio pipeline of `data.audio` (see polymodal.data.audio)."""
        try:
            return AudioClips(train, **self.audio)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.audio: {err}") from err

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _loader(self, urls: list[str], train: bool) -> wds.WebLoader:
        rank, world = self.rank_and_world
        field = "data.train_shards" if train else "data.val_shards"
        sizes = None if train and self.resampled else self.shard_sizes(urls, field)
        batch_size = self.batch_size if train else self.val_batch_size
        if train:
            batches = self.batches_per_epoch(sizes)
        else:
            if sum(sizes) < world:
                raise ConfigError(f"data.val_shards: {sum(sizes)} samples < {world} ranks")
            first, last = split_range(sum(sizes), world, rank)
            batches = -(-(last - first) // batch_size)
        workers = min(self.num_workers, max(batches, 1))
        decoder = self.decoder(train)
        dataset = ShardedSamples(
            urls,
            sizes,
            decoder,
            TokenizingCollate(self.tokenizer, decoder.audio),
            batch_size=batch_size,
            batches_per_rank=batches if train else None,
            rank=rank,
            world_size=world,
            seed=self.seed,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            resampled=train and self.resampled,
            strict=self.strict,
        )
        if train:
            # 0 workers read like 1 (the stream of worker 0)
            self.position = {"layout": [world, max(workers, 1), batch_size, batches, len(urls)]}
            self.resume_stream(dataset)
        # the dataset yields exactly `batches` per epoch: no with_epoch, which would fill a
        # resumed epoch's remainder with the next epoch's batches
        return wds.WebLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context=self.worker_start_method if workers > 0 else None,
            worker_init_fn=ignore_job_signals,
        )

    def resume_stream(self, dataset: ShardedSamples) -> None:
        """Continue a checkpoint's stream: the next batch is the one after the last batch
        trained before it was saved. Exact when the layout (ranks, workers, batch size,
        batches per epoch, shards) is unchanged; otherwise the next epoch starts."""
        if not self.resume:
            return
        state, self.resume = self.resume, {}
        epoch, done, first = state["epoch"], dict(state["done"]), state["next_worker"]
        if state["layout"] != self.position["layout"]:
            log.warning(
                "data: the training stream changed shape since the checkpoint (ranks, "
                "workers, batch size, batches per epoch, shards: %s -> %s); the rest of "
                "epoch %d is not read, training continues with epoch %d",
                state["layout"],
                self.position["layout"],
                epoch,
                epoch + 1,
            )
            epoch, done, first = epoch + 1, {}, 0
        elif sum(done.values()) >= self.position["layout"][3]:
            epoch, done, first = epoch + 1, {}, 0
        dataset.start(epoch, done, first)
        self.position.update(epoch=epoch, done=done, next_worker=first)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Record each trained batch's cursor (this hook runs for the batch about to be
        trained, not for the one the loop prefetched), so checkpoints hold the position."""
        cursor = batch.pop("cursor", None)
        if cursor is not None and self.trainer is not None and self.trainer.training:
            epoch, worker, number = cursor
            if self.position.get("epoch") != epoch:
                self.position.update(epoch=epoch, done={})
            self.position["done"][worker] = number
            self.position["next_worker"] = (worker + 1) % self.position["layout"][1]
        return batch

    def state_dict(self) -> dict:
        """Saved in every checkpoint: where the training stream stands."""
        if "epoch" not in self.position:
            return {}
        return {**self.position, "done": dict(self.position["done"])}

    def load_state_dict(self, state: dict) -> None:
        self.resume = dict(state)

    def batches_per_epoch(self, sizes: Sequence[int] | None = None) -> int:
        """Training batches each rank takes per epoch: samples // (batch * world)."""
        if self.train_samples is not None and not self.resampled:
            raise ConfigError(
                "data.train_samples: only for data.resampled=true; a non-resampled epoch "
                "reads every sample of the shards"
            )
        if self.train_samples is not None:
            samples = self.train_samples
        else:
            if sizes is None:
                urls = expand_shards(self.train_shards, "data.train_shards")
                sizes = self.shard_sizes(urls, "data.train_shards")
            samples = sum(sizes)
        _, world = self.rank_and_world
        batches = samples // (self.batch_size * world)
        if batches == 0:
            raise ConfigError(
                f"data.train_shards: {samples} samples < data.batch_size {self.batch_size} "
                f"x {world} ranks"
            )
        return batches

    def train_dataloader(self) -> wds.WebLoader:
        return self._loader(expand_shards(self.train_shards, "data.train_shards"), train=True)

    def val_dataloader(self) -> wds.WebLoader:
        if self.val_shards is None:
            return []
        return self._loader(expand_shards(self.val_shards, "data.val_shards"), train=False)
