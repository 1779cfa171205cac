"""Streaming image-text DataModule over webdataset tar shards.

Shards are found, counted and decoded by `polymodal.data.shards`; each rank's and each
worker's exact, resumable share of an epoch is `polymodal.data.stream.ShardedSamples`.
Rank and world size come from the trainer, never from environment guessing, so
spawn/forkserver workers split correctly too. Decoding, augmentation, tokenisation and
batching all happen inside the loader workers.
"""

from __future__ import annotations

import logging
import math
import os
import re
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
from polymodal.data.stream import BatchStream, MixedSamples, ShardedSamples, split_range
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


SOURCE_KEYS = {"shards", "weight", "modalities"}
VAL_SET_KEYS = {"shards", "modalities", "zeroshot"}


class WebDataModule(L.LightningDataModule):
    """Shards -> batches {image, audio, text_ids, text_mask, text, key, meta, skipped}
    holding `modalities` (each sample must have all of them; a source or val set may
    name fewer).

    `sources` (name -> {shards, weight, modalities}) replaces `train_shards` with several
    shard sets mixed per batch (MixedSamples: one run trains image-text and audio-text),
    `val_sets` (name -> {shards, modalities, zeroshot}) replaces `val_shards` with
    several val sets, each validated and reported on its own (`val/<name>/...`).

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
        interpolation: str = "bilinear",
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
        sources: Mapping[str, Mapping] | None = None,
        val_sets: Mapping[str, Mapping] | None = None,
    ) -> None:
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.tokenizer_path, self.context_length = tokenizer, context_length
        self.special_tokens = special_tokens
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size, self.crop_scale, self.hflip = image_size, crop_scale, hflip
        self.interpolation = interpolation
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
        self.sources = self.named_sets("sources", sources, SOURCE_KEYS, train_shards)
        self.val_sets = self.named_sets("val_sets", val_sets, VAL_SET_KEYS, val_shards)
        if self.sources and not resampled:
            raise ConfigError(
                "data.sources: mixed sources draw shards with replacement; set data.resampled=true"
            )
        if self.sources and val_shards is not None:  # its samples would need every modality
            raise ConfigError(
                "data.sources: validate with data.val_sets (each with its modalities), "
                "and set data.val_shards=null"
            )
        if self.val_sets and self.zeroshot:
            raise ConfigError(
                "data.zeroshot: with data.val_sets each set has its own "
                "(data.val_sets.<name>.zeroshot); set data.zeroshot={}"
            )
        self.counts: dict[tuple[str, ...], list[int]] = {}  # shard list -> sizes, read once
        self.tokenizer: TextTokenizer | None = None
        # the training stream's position: the last trained batch of each loader worker
        self.position: dict = {}
        self.resume: dict = {}  # a checkpoint's position, applied by train_dataloader

    def named_sets(
        self, field: str, sets: Mapping[str, Mapping] | None, keys: set[str], replaced: object
    ) -> dict[str, dict]:
        """`data.sources` / `data.val_sets` checked, each set's modalities filled in
        (default: data.modalities) and a source's weight (default 1)."""
        if not sets:
            return {}
        other = "train_shards" if field == "sources" else "val_shards"
        if replaced is not None:
            raise ConfigError(f"data.{field} replaces data.{other}: set data.{other}=null")
        result = {}
        for name, spec in sets.items():
            spec = dict(spec or {})
            if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
                raise ConfigError(f"data.{field}.{name}: names are letters, digits, _ and -")
            unknown = sorted(set(spec) - keys)
            if unknown:
                raise ConfigError(f"data.{field}.{name}: unknown {unknown} (takes {sorted(keys)})")
            if "shards" not in spec:
                raise ConfigError(f"data.{field}.{name}.shards: required")
            modalities = tuple(spec.get("modalities") or self.modalities)
            if not set(modalities) <= set(self.modalities):
                raise ConfigError(
                    f"data.{field}.{name}.modalities: {list(modalities)} are not all in "
                    f"data.modalities {list(self.modalities)}"
                )
            spec["modalities"] = modalities
            if field == "sources":
                weight = spec.get("weight", 1.0)
                ok = isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0
                if not ok or isinstance(weight, bool):
                    raise ConfigError(f"data.sources.{name}.weight: {weight!r}; a number > 0")
                spec["weight"] = float(weight)
            result[str(name)] = spec
        return result

    @property
    def validation_sets(self) -> dict[str, dict]:
        """name -> {shards, modalities, zeroshot, field} of each val set validated: the
        `val_sets`, or `val_shards` under the name "" (reported as `val/...`)."""
        if self.val_sets:
            return {
                name: {"zeroshot": {}, **spec, "field": f"data.val_sets.{name}.shards"}
                for name, spec in self.val_sets.items()
            }
        if self.val_shards is None:
            return {}
        spec = {"shards": self.val_shards, "modalities": self.modalities, "zeroshot": self.zeroshot}
        return {"": {**spec, "field": "data.val_shards"}}

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
            for _, field, urls, modalities in self.train_parts():
                self.check_usable(urls, field, modalities)

    def train_parts(self) -> list[tuple[str, str, list[str], tuple[str, ...]]]:
        """(source name, config field, shard urls, modalities) of each training source;
        data.train_shards is the source ""."""
        parts = [("", "data.train_shards", self.train_shards, self.modalities)]
        if self.sources:
            parts = [
                (name, f"data.sources.{name}.shards", spec["shards"], spec["modalities"])
                for name, spec in self.sources.items()
            ]
        return [(n, f, expand_shards(shards, f), m) for n, f, shards, m in parts]

    def check_usable(
        self, urls: Sequence[str], field: str, modalities: Sequence[str] | None = None
    ) -> None:
        """Fail before training, in one line, when no shard holds a usable sample. Reads the
        shards in order until one sample decodes, so a healthy set costs one sample."""
        skips = SkipPolicy(quiet=True)
        for _ in decoded_samples(urls, self.decoder(False, modalities), skips):
            return
        first = f" (first problem: {skips.first})" if skips.first else " (all empty)"
        raise ConfigError(f"{field}: no usable sample in {len(urls)} shard(s){first}")

    def shard_sizes(self, urls: Sequence[str], field: str) -> list[int]:
        """Per-shard sample counts (`shard_sizes`), looked up once per shard list: shards
        without a sizes.json are counted only the first time."""
        key = tuple(urls)
        if key not in self.counts:
            split_key = KeySplitter(self.decoder(train=False).extensions)
            self.counts[key] = shard_sizes(urls, field, split_key)
        return self.counts[key]

    def decoder(self, train: bool, modalities: Sequence[str] | None = None) -> SampleDecoder:
        """The decoder of samples holding `modalities` (default: data.modalities)."""
        modalities = tuple(modalities or self.modalities)
        return SampleDecoder(
            image_transform(
                self.image_size,
                train,
                self.crop_scale,
                self.hflip,
                interpolation=self.interpolation,
            ),
            self.image_keys,
            self.text_keys,
            max_pixels=self.max_pixels,
            max_caption_bytes=self.max_caption_bytes,
            modalities=modalities,
            audio=self.audio_clips(train) if "audio" in modalities else None,
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

    def collate(self, train: bool) -> TokenizingCollate:
        audio = self.audio_clips(train) if "audio" in self.modalities else None
        return TokenizingCollate(self.tokenizer, audio)

    def samples(
        self,
        urls: list[str],
        sizes: list[int] | None,
        train: bool,
        modalities: Sequence[str] | None = None,
        batches: int | None = None,
        name: str = "",
    ) -> ShardedSamples:
        """One shard set's stream: training (`batches` per rank) or evaluation."""
        rank, world = self.rank_and_world
        return ShardedSamples(
            urls,
            sizes,
            self.decoder(train, modalities),
            self.collate(train),
            batch_size=self.batch_size if train else self.val_batch_size,
            batches_per_rank=batches,
            rank=rank,
            world_size=world,
            seed=self.seed,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            resampled=train and self.resampled,
            strict=self.strict,
            name=name,
        )

    def loader(self, dataset: BatchStream, workers: int) -> wds.WebLoader:
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

    def train_dataloader(self) -> wds.WebLoader:
        parts = self.train_parts()
        if self.sources:
            batches = self.batches_per_epoch()
            streams = {
                name: self.samples(urls, None, True, modalities, batches, name)
                for name, _, urls, modalities in parts
            }
            weights = {name: spec["weight"] for name, spec in self.sources.items()}
            dataset: BatchStream = MixedSamples(streams, weights)
            shards = [[name, len(urls), weights[name]] for name, _, urls, _ in parts]
        else:
            ((_, field, urls, _),) = parts
            sizes = None if self.resampled else self.shard_sizes(urls, field)
            batches = self.batches_per_epoch(sizes)
            dataset, shards = self.samples(urls, sizes, True, batches=batches), len(urls)
        world, workers = self.rank_and_world[1], min(self.num_workers, batches)
        # 0 workers read like 1 (the stream of worker 0)
        self.position = {"layout": [world, max(workers, 1), self.batch_size, batches, shards]}
        self.resume_stream(dataset)
        return self.loader(dataset, workers)

    def val_dataloader(self) -> wds.WebLoader | list[wds.WebLoader]:
        """One loader per val set (a list when `val_sets` names several)."""
        rank, world = self.rank_and_world
        loaders = []
        for spec in self.validation_sets.values():
            urls = expand_shards(spec["shards"], spec["field"])
            sizes = self.shard_sizes(urls, spec["field"])
            total = sum(sizes)
            if total < world:
                raise ConfigError(f"{spec['field']}: {total} samples < {world} ranks")
            first, last = split_range(total, world, rank)
            batches = -(-(last - first) // self.val_batch_size)
            dataset = self.samples(urls, sizes, False, spec["modalities"])
            loaders.append(self.loader(dataset, min(self.num_workers, max(batches, 1))))
        return loaders if self.val_sets else (loaders[0] if loaders else [])

    def resume_stream(self, dataset: BatchStream) -> None:
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
        elif sizes is not None:
            samples = sum(sizes)
        else:  # every training source's samples
            samples = sum(sum(self.shard_sizes(u, f)) for _, f, u, _ in self.train_parts())
        _, world = self.rank_and_world
        batches = samples // (self.batch_size * world)
        if batches == 0:
            field = "data.sources" if self.sources else "data.train_shards"
            field = "data.train_samples" if self.train_samples is not None else field
            raise ConfigError(
                f"{field}: {samples} samples < data.batch_size {self.batch_size} x {world} ranks"
            )
        return batches
