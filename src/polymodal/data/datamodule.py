"""Streaming image-text DataModule over webdataset tar shards.

Each rank reads its own contiguous part of the epoch's samples (rank and world size come
from the trainer, never from environment guessing, so spawn/forkserver workers split
correctly too), each worker a part of that; shards and samples are shuffled with seeds
derived from the config seed, the epoch, the rank and the worker. Decoding, augmentation,
tokenisation and batching all happen inside the workers. Every rank takes exactly the
same number of training batches per epoch, so DDP's collectives never wait for a rank
that ran out of data.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from polymodal.data.tario import count_samples
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.utils.errors import ConfigError, SkippedSample

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold
DEFAULT_MAX_CAPTION_BYTES = 65_536  # ~10k words: far past any text tower's context
PAD_POOL = 16  # decoded samples a reader keeps to fill in for skipped ones
TEXT_KEYS = ("txt",)
DEFAULT_EXTENSIONS = (*IMAGE_KEYS, *TEXT_KEYS, "json")


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


def shard_sizes(
    urls: Sequence[str], field: str, split_key: Callable[[str], tuple[str, str]] | None = None
) -> list[int]:
    """Sample count of each shard: from the `sizes.json` next to it (open_clip convention),
    else from img2dataset's `<shard>_stats.json` (`successes`), else counted from the tar's
    member headers (no decoding; `split_key` groups members into samples as training does),
    with one log line for all counted shards."""
    sizes, cache, counted = [], {}, []
    start = time.perf_counter()
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file not in cache:
            cache[sizes_file] = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
        stats_file = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
        if path.name in cache[sizes_file]:
            sizes.append(int(cache[sizes_file][path.name]))
        elif stats_file.exists():
            sizes.append(int(json.loads(stats_file.read_text())["successes"]))
        elif "://" not in url:
            sizes.append(count_samples(url, split_key or KeySplitter(DEFAULT_EXTENSIONS)))
            counted.append(sizes[-1])
        else:
            raise ConfigError(
                f"{field}: no sample count for {url} in {sizes_file} or {stats_file.name}; "
                "write a sizes.json (or stream with data.resampled=true and data.train_samples)"
            )
    if counted:
        log.info(
            "%s: no sizes.json entry for %d shard(s); counted %d samples from their tar "
            "headers in %.1fs (`polymodal-data count` writes a sizes.json)",
            field,
            len(counted),
            sum(counted),
            time.perf_counter() - start,
        )
    return sizes


class KeySplitter:
    """Tar member name -> (sample key, extension). A name ending in one of `extensions`
    keeps everything before it as the key, so keys may contain dots (`img.001.jpg`);
    other names split at the first dot, as webdataset does. (A class, not a closure, so
    spawned loader workers can unpickle it.)"""

    def __init__(self, extensions: Sequence[str]) -> None:
        self.known = sorted({e.lower() for e in extensions}, key=len, reverse=True)

    def __call__(self, name: str) -> tuple[str, str]:
        lower = name.lower()
        for extension in self.known:
            if lower.endswith("." + extension) and len(name) > len(extension) + 1:
                return name[: -len(extension) - 1], extension
        return base_plus_ext(name)


def tar_samples(url: str, split_key: Callable, handler: Callable[[Exception], bool]):
    """Raw samples ({__key__, __url__, ext: bytes}) of one tar shard."""
    streams = url_opener([{"url": url}], handler=handler)
    files = tar_file_expander(streams, handler=handler)
    return group_by_keys(files, keys=split_key, handler=handler)


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` near-equal runs."""
    return total * index // parts, total * (index + 1) // parts


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


class SampleDecoder:
    """Raw tar sample -> {image, text, key, meta}; raises SkippedSample naming shard, key
    and reason.

    Shards are input from elsewhere: an image whose header declares more than `max_pixels`
    is refused before its pixels are decoded (a 140 KB PNG can hold 144 Mpx, 1.5 GB
    decoded), and a caption over `max_caption_bytes` before it is tokenised.
    """

    def __init__(
        self,
        transform: Callable,
        image_keys: Sequence[str] = IMAGE_KEYS,
        text_keys: Sequence[str] = TEXT_KEYS,
        meta_key: str = "json",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    ) -> None:
        self.transform = transform
        self.image_keys = tuple(image_keys)
        self.text_keys = tuple(text_keys)
        self.meta_key = meta_key
        self.max_pixels, self.max_caption_bytes = max_pixels, max_caption_bytes

    @property
    def extensions(self) -> tuple[str, ...]:
        """Every member extension this decoder reads (for splitting keys with dots)."""
        return (*self.image_keys, *self.text_keys, self.meta_key)

    def __call__(self, sample: dict) -> dict:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image_key = next((k for k in self.image_keys if k in sample), None)
        text_key = next((k for k in self.text_keys if k in sample), None)
        if image_key is None or text_key is None:
            missing, wanted = (
                ("image", self.image_keys) if image_key is None else ("text", self.text_keys)
            )
            raise SkippedSample(
                f"no_{missing}", f"{where}: no {missing} member (looked for {wanted})"
            )
        size = len(sample[text_key])
        if size > self.max_caption_bytes:
            raise SkippedSample(
                "caption_too_long",
                f"{where}: {size}-byte caption > data.max_caption_bytes {self.max_caption_bytes}",
            )
        try:
            with Image.open(io.BytesIO(sample[image_key])) as img:
                width, height = img.size  # from the header: nothing decoded yet
                if width * height > self.max_pixels:
                    raise SkippedSample(
                        "too_many_pixels",
                        f"{where}: {width}x{height} image > data.max_pixels {self.max_pixels}",
                    )
                image = self.transform(img.convert("RGB"))
            text = sample[text_key].decode("utf-8").strip()
            meta = json.loads(sample[self.meta_key]) if self.meta_key in sample else {}
        except SkippedSample:
            raise
        except Exception as exc:  # noqa: BLE001 - any decode failure is a bad sample
            raise SkippedSample(
                "undecodable", f"{where}: cannot decode ({type(exc).__name__}: {exc})"
            ) from exc
        if not text:
            raise SkippedSample("empty_caption", f"{where}: empty caption")
        return {"image": image, "text": text, "key": sample["__key__"], "meta": meta}


class ShardedSamples(IterableDataset):
    """Decoded, batched samples: this rank's and this worker's share of one epoch.

    Non-resampled: the shards, shuffled with (seed, epoch) (the same order on every rank),
    are read as one sequence of samples (counts from `shard_sizes`); each (rank, worker)
    takes a contiguous range of it, so every sample of an epoch goes to exactly one
    reader, and only a boundary shard is opened by two readers (each skips the other's
    part). Resampled: each (rank, worker) draws shards with replacement.

    With `batches_per_rank` (training) every rank yields exactly that many full batches per
    epoch, split over its workers; the < W*B samples that would leave ranks uneven are
    dropped (a different few each epoch). A reader that comes up short (bad samples
    skipped, a truncated shard) repeats samples it already yielded, so ranks never fall
    out of step and collectives never hang. Without it (evaluation) ranks split every
    sample, the last batch may be partial. Bad samples are skipped and counted
    (`batch["skipped"]`), or raise when `strict`.

    Every random choice (shard order, shuffle buffer, each sample's augmentation) is
    seeded from (seed, epoch, rank, worker, position), never from the process's global
    random state, so a worker's stream is a pure function of its position. Each batch
    carries `cursor` = (epoch, worker, batch number); `start(epoch, done, first)` makes
    the next iteration resume that epoch after the batches each worker already delivered:
    they are rebuilt (decoded, so skipped samples are skipped again) but not yielded, and
    loader worker 0 plays stream worker `first` (the DataLoader takes batches from its
    workers round-robin, always from worker 0 first), so exactly the batches of an
    uninterrupted run follow, in the same order.
    """

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int] | None,
        decoder: SampleDecoder,
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        batches_per_rank: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if sizes is None and not (resampled and batches_per_rank):
            raise ConfigError("per-shard sizes are needed unless resampling a fixed epoch")
        self.urls, self.sizes = list(urls), None if sizes is None else list(sizes)
        self.decoder, self.collate = decoder, collate
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.resampled, self.strict = resampled, strict
        self.split_key = KeySplitter(decoder.extensions)
        self.epoch = -1
        self.done: dict[int, int] = {}  # worker -> batches of the next epoch to rebuild unseen
        self.first = 0  # the stream worker that loader worker 0 plays in the next epoch
        self.skipped: Counter[str] = Counter()  # reason -> samples skipped

    def start(self, epoch: int, done: Mapping[int, int], first: int = 0) -> None:
        """Make the next iteration epoch `epoch`, each stream worker resuming after its
        first `done[worker]` batches, loader worker i playing stream worker first + i (set
        before the loader's workers copy the dataset)."""
        self.epoch, self.done, self.first = epoch - 1, dict(done), first

    def skip(self, exc: Exception) -> bool:
        if self.strict:
            raise exc
        self.skipped[getattr(exc, "reason", "unreadable")] += 1
        log.warning("skipping bad sample: %s", exc)
        return True

    def sample_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """[start, stop) positions in the epoch's sample sequence read by this worker."""
        if self.batches_per_rank is None:
            first, last = split_range(sum(self.sizes), self.world_size, self.rank)
            lo, hi = split_range(last - first, num_workers, worker)
            return first + lo, first + hi
        base = self.rank * self.batches_per_rank * self.batch_size
        lo, hi = split_range(self.batches_per_rank, num_workers, worker)
        return base + lo * self.batch_size, base + hi * self.batch_size

    def range_stream(self, start: int, stop: int) -> Iterator[dict]:
        """Raw samples at positions [start, stop) of this epoch's shard order."""
        order = list(zip(self.urls, self.sizes, strict=True))
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        offset = 0
        for url, size in order:
            lo, hi = max(start, offset) - offset, min(stop, offset + size) - offset
            offset += size
            if lo >= hi:
                continue
            for index, sample in enumerate(tar_samples(url, self.split_key, self.skip)):
                if index >= hi:
                    break
                if index >= lo:
                    yield sample

    def resampled_stream(self, rng: random.Random) -> Iterator[dict]:
        """Raw samples of shards drawn with replacement, forever."""
        empty_draws = 0
        while empty_draws < 4 * len(self.urls):
            empty_draws += 1
            url = rng.choice(self.urls)
            for sample in tar_samples(url, self.split_key, self.skip):
                empty_draws = 0
                yield sample
        raise ConfigError(f"data: no sample in {4 * len(self.urls)} draws from {self.urls[0]}, ...")

    def decoded(self, raw: Iterator[dict], seed: int) -> Iterator[dict]:
        """Decoded samples; the n-th sample's augmentation draws from seed + n alone (the
        CPU generator is seeded for it and restored after, so training's stream, in this
        process when there are no workers, is untouched)."""
        for index, sample in enumerate(raw):
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed + index)
                    decoded = self.decoder(sample)
            except ValueError as exc:
                self.skip(exc)
                continue
            yield decoded

    def exactly(self, samples: Iterator[dict], count: int, where: str) -> Iterator[dict]:
        """`count` samples; when the stream runs short, repeats the first ones it yielded
        (at most `PAD_POOL` of them are kept in memory for that)."""
        kept: list[dict] = []
        yielded = 0
        for sample in samples:
            if yielded == count:
                return
            if len(kept) < PAD_POOL:
                kept.append(sample)
            yielded += 1
            yield sample
        if yielded < count:
            if not kept:
                raise ValueError(f"data: no usable sample in {where}")
            log.warning(
                "data: %s yielded %d of %d samples; repeating some to keep ranks in step",
                where,
                yielded,
                count,
            )
            for i in range(count - yielded):
                yield kept[i % len(kept)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.first) % num_workers
        self.epoch += 1
        done, self.done, self.first = self.done.get(worker, 0), {}, 0
        stream = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        rng = random.Random(stream)
        where = f"rank {self.rank} worker {worker} epoch {self.epoch}"
        if self.resampled:
            lo, hi = split_range(self.batches_per_rank, num_workers, worker)
            raw, wanted = self.resampled_stream(rng), (hi - lo) * self.batch_size
        else:
            start, stop = self.sample_range(worker, num_workers)
            raw, wanted = self.range_stream(start, stop), stop - start
        if wanted == 0:
            return
        if self.shuffle:
            raw = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer // 4, rng=rng)(raw)
        samples = self.decoded(raw, random.Random(f"augment-{stream}").getrandbits(62))
        if self.batches_per_rank is not None:
            samples = self.exactly(samples, wanted, where)
        yield from self.batched(samples, where, worker, done)

    def batched(
        self, samples: Iterator[dict], where: str, worker: int, done: int
    ) -> Iterator[dict]:
        """Batches of `samples`; the first `done` are rebuilt but not yielded (resume), and
        the samples skipped while rebuilding them are not reported again."""
        batch: list[dict] = []
        reported, usable, number = self.skipped.copy(), 0, 0
        for sample in samples:
            batch.append(sample)
            usable += 1
            if len(batch) == self.batch_size:
                number += 1
                if number > done:
                    yield self._collate(batch, reported, (self.epoch, worker, number))
                batch, reported = [], self.skipped.copy()
        if batch:  # only evaluation has partial batches: training counts are exact
            yield self._collate(batch, reported, (self.epoch, worker, number + 1))
        if usable == 0:
            raise ValueError(f"data: no usable sample in {where}")

    def _collate(
        self, batch: list[dict], reported: Counter[str], cursor: tuple[int, int, int]
    ) -> dict:
        out = self.collate(batch)
        out["skipped"] = dict(self.skipped - reported)  # reason -> count since the last batch
        out["cursor"] = cursor
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
        decoder = self.decoder(train=False)
        split_key = KeySplitter(decoder.extensions)
        problems: list[Exception] = []

        def note(exc: Exception) -> bool:
            problems.append(exc)
            return True

        for url in urls:
            for sample in tar_samples(url, split_key, note):
                try:
                    decoder(sample)
                    return
                except ValueError as exc:
                    problems.append(exc)
        first = f" (first problem: {problems[0]})" if problems else " (all empty)"
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
        )

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
        dataset = ShardedSamples(
            urls,
            sizes,
            self.decoder(train),
            TokenizingCollate(self.tokenizer),
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
