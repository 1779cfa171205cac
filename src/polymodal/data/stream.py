"""The exact training stream: each rank's and each loader worker's share of an epoch's
samples, decoded, batched and resumable (`ShardedSamples`).

Each rank reads its own contiguous part of the epoch's samples, each worker a part of
that; shards and samples are shuffled with seeds derived from the config seed, the epoch,
the rank and the worker. Every rank takes exactly the same number of training batches per
epoch, so DDP's collectives never wait for a rank that ran out of data. Shards are read
and samples decoded by `polymodal.data.shards`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from polymodal.data.shards import KeySplitter, SampleDecoder, SkipPolicy, tar_samples
from polymodal.utils.errors import ConfigError

log = logging.getLogger(__name__)

PAD_POOL = 16  # decoded samples a reader keeps to fill in for skipped ones


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` near-equal runs."""
    return total * index // parts, total * (index + 1) // parts


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
        self.skip = SkipPolicy(strict)  # counts skipped samples by reason, or raises

    def start(self, epoch: int, done: Mapping[int, int], first: int = 0) -> None:
        """Make the next iteration epoch `epoch`, each stream worker resuming after its
        first `done[worker]` batches, loader worker i playing stream worker first + i (set
        before the loader's workers copy the dataset)."""
        self.epoch, self.done, self.first = epoch - 1, dict(done), first

    @property
    def skipped(self) -> Counter[str]:
        """Reason -> samples skipped so far (in this process)."""
        return self.skip.counts

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
        """The collated batch; its random choices (SpecAugment masks) draw from a generator
        seeded by (seed, rank, cursor) alone, so a resumed stream masks what the
        uninterrupted one masked."""
        key = f"collate-{self.seed}-{self.rank}-{cursor}"
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(random.Random(key).getrandbits(62))
            out = self.collate(batch)
        out["skipped"] = dict(self.skipped - reported)  # reason -> count since the last batch
        out["cursor"] = cursor
        return out
