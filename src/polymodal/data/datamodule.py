"""Streaming image-text DataModule over webdataset tar shards.

Each rank reads its own shards (rank and world size come from the trainer, never from
environment guessing, so spawn/forkserver workers split correctly too), each worker a
slice of those; shards and samples are shuffled with seeds derived from the config seed,
the epoch, the rank and the worker. Decoding, augmentation, tokenisation and batching all
happen inside the workers. Training epochs have a fixed number of batches per rank
(`WebLoader.with_epoch`), so every rank takes the same number of steps.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.utils.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
TEXT_KEYS = ("txt",)


def _expand_one(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern))
    return wds.shardlists.expand_urls(pattern)


def expand_shards(pattern: str | Sequence[str], field: str) -> list[str]:
    """Expand shard patterns and check the shards exist.

    Accepts brace ranges (`a-{000000..000009}.tar`), globs (`train/*.tar`), `::`-joined
    patterns, or a list of any of these.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [url for p in patterns for part in p.split("::") for url in _expand_one(part)]
    missing = [u for u in urls if "://" not in u and not Path(u).exists()]
    if not urls or len(missing) == len(urls):
        raise ConfigError(f"{field}: no shard matches {pattern!r}")
    if missing:
        raise ConfigError(f"{field}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return urls


def count_samples(urls: Sequence[str], field: str) -> int:
    """Total samples from the `sizes.json` files next to the shards (open_clip convention)."""
    total, cache = 0, {}
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file not in cache:
            cache[sizes_file] = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
        if path.name not in cache[sizes_file]:
            raise ConfigError(
                f"{field}: no sample count for {url} in {sizes_file}; "
                "set data.train_samples or write a sizes.json"
            )
        total += int(cache[sizes_file][path.name])
    return total


class SampleDecoder:
    """Raw tar sample -> {image, text, key, meta}; raises ValueError naming shard and key."""

    def __init__(
        self,
        transform: Callable,
        image_keys: Sequence[str] = IMAGE_KEYS,
        text_keys: Sequence[str] = TEXT_KEYS,
        meta_key: str = "json",
    ) -> None:
        self.transform = transform
        self.image_keys = tuple(image_keys)
        self.text_keys = tuple(text_keys)
        self.meta_key = meta_key

    def __call__(self, sample: dict) -> dict:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image_key = next((k for k in self.image_keys if k in sample), None)
        text_key = next((k for k in self.text_keys if k in sample), None)
        if image_key is None or text_key is None:
            missing = "image" if image_key is None else "text"
            raise ValueError(f"{where}: no {missing} member (looked for {self.image_keys})")
        try:
            with Image.open(io.BytesIO(sample[image_key])) as img:
                image = self.transform(img.convert("RGB"))
            text = sample[text_key].decode("utf-8").strip()
            meta = json.loads(sample[self.meta_key]) if self.meta_key in sample else {}
        except Exception as exc:  # noqa: BLE001 - any decode failure is a bad sample
            raise ValueError(f"{where}: cannot decode ({type(exc).__name__}: {exc})") from exc
        if not text:
            raise ValueError(f"{where}: empty caption")
        return {"image": image, "text": text, "key": sample["__key__"], "meta": meta}


class ShardedSamples(IterableDataset):
    """Decoded, batched samples of this rank's and this worker's shards.

    Non-resampled: each epoch shuffles the shard list with (seed, epoch) — the same order
    on every rank — and rank r takes shards r, r+W, ...; worker w of that rank every
    num_workers-th of those. Resampled: each (rank, worker) draws shards with replacement.
    Bad samples are skipped and counted (`batch["skipped"]`), or raise when `strict`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        decoder: SampleDecoder,
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        partial: bool = False,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.decoder, self.collate = decoder, collate
        self.batch_size, self.partial = batch_size, partial
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.resampled, self.strict = resampled, strict
        self.epoch = -1
        self.skipped = 0

    def worker_shards(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        yield from order[self.rank :: self.world_size][worker::num_workers]

    def skip(self, exc: Exception) -> bool:
        if self.strict:
            raise exc
        self.skipped += 1
        log.warning("skipping bad sample: %s", exc)
        return True

    def samples(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        self.epoch += 1
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        shards = self.worker_shards(worker, num_workers, rng)
        raw = tarfile_samples(({"url": url} for url in shards), handler=self.skip)
        if self.shuffle:
            raw = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer // 4, rng=rng)(raw)
        usable = 0
        for sample in raw:
            try:
                decoded = self.decoder(sample)
            except ValueError as exc:
                self.skip(exc)
                continue
            usable += 1
            yield decoded
        if usable == 0 and not self.resampled:
            mine = list(self.worker_shards(worker, num_workers, rng))
            if mine:
                raise ValueError(f"data: no usable sample in {len(mine)} shard(s), e.g. {mine[0]}")

    def __iter__(self) -> Iterator[dict]:
        batch: list[dict] = []
        reported = self.skipped
        for sample in self.samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch, reported)
                batch, reported = [], self.skipped
        if batch and self.partial:
            yield self._collate(batch, reported)

    def _collate(self, batch: list[dict], reported: int) -> dict:
        out = self.collate(batch)
        out["skipped"] = self.skipped - reported
        return out


class TokenizingCollate:
    """Stacks images and tokenises captions (in the worker, not the training loop)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        texts = [s["text"] for s in samples]
        ids, mask = self.tokenizer.encode(texts)
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text_ids": ids,
            "text_mask": mask,
            "text": texts,
            "key": [s["key"] for s in samples],
            "meta": [s["meta"] for s in samples],
        }


class WebDataModule(L.LightningDataModule):
    """Image-text shards -> batches {image, text_ids, text_mask, text, key, meta, skipped}.

    `zeroshot` describes how the val split is scored zero-shot (see EmbeddingEvaluator);
    it lives with the data because the labels and class names belong to the dataset.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None,
        tokenizer: str,
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
        prepare: Callable[[], object] | None = None,
        zeroshot: Mapping | None = None,
    ) -> None:
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.tokenizer_path, self.context_length = tokenizer, context_length
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size, self.crop_scale, self.hflip = image_size, crop_scale, hflip
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.train_samples, self.seed, self.strict = train_samples, seed, strict
        self.image_keys, self.text_keys = image_keys, text_keys
        self.prepare = prepare
        self.zeroshot = zeroshot
        self.tokenizer: TextTokenizer | None = None

    def prepare_data(self) -> None:
        """Generate built-in data (e.g. the shapes dataset) if the config asks for it."""
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            try:
                self.tokenizer = TextTokenizer(self.tokenizer_path, self.context_length)
            except FileNotFoundError as err:
                raise ConfigError(f"data.tokenizer: {err}") from err

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _loader(self, urls: list[str], train: bool, num_batches: int | None) -> wds.WebLoader:
        rank, world = self.rank_and_world
        shards_per_rank = len(urls) if train and self.resampled else len(urls[rank::world])
        workers = min(self.num_workers, max(shards_per_rank, 1))
        if workers < self.num_workers:
            log.info(
                "data: %d shards for rank %d -> using %d workers", shards_per_rank, rank, workers
            )
        decoder = SampleDecoder(
            image_transform(self.image_size, train, self.crop_scale, self.hflip),
            self.image_keys,
            self.text_keys,
        )
        dataset = ShardedSamples(
            urls,
            decoder,
            TokenizingCollate(self.tokenizer),
            batch_size=self.batch_size if train else self.val_batch_size,
            rank=rank,
            world_size=world,
            seed=self.seed,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            resampled=train and self.resampled,
            partial=not train,
            strict=self.strict,
        )
        loader = wds.WebLoader(
            dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0
        )
        return loader.with_epoch(num_batches) if num_batches else loader

    def batches_per_epoch(self) -> int:
        """Training batches each rank takes per epoch (samples / (batch * world))."""
        urls = expand_shards(self.train_shards, "data.train_shards")
        samples = self.train_samples or count_samples(urls, "data.train_shards")
        _, world = self.rank_and_world
        batches = samples // (self.batch_size * world)
        if batches == 0:
            raise ConfigError(
                f"data.train_shards: {samples} samples < data.batch_size {self.batch_size} "
                f"x {world} ranks"
            )
        return batches

    def train_dataloader(self) -> wds.WebLoader:
        urls = expand_shards(self.train_shards, "data.train_shards")
        return self._loader(urls, train=True, num_batches=self.batches_per_epoch())

    def val_dataloader(self) -> wds.WebLoader:
        if self.val_shards is None:
            return []
        return self._loader(expand_shards(self.val_shards, "data.val_shards"), False, None)
