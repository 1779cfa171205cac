"""The exact training stream: each rank's and each loader worker's share of an epoch's
samples, decoded, batched and resumable (`ShardedSamples`).

Each rank reads its own contiguous part of the epoch's samples, each worker a part of
that; shards and samples are shuffled with seeds derived from the config seed, the epoch,
the rank and the worker. Every rank takes exactly the same number of training batches per
epoch, so DDP's collectives never wait for a rank that ran out of data. Shards are read
and samples decoded by `polymodal.data.shards`.
"""

from __future__ import annotations

import itertools
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


def chunked(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Lists of `size` samples; the last may be shorter (only evaluation has one: training
    counts are exact)."""
    while batch := list(itertools.islice(samples, size)):
        yield batch


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` near-equal runs."""
    return total * index // parts, total * (index + 1) // parts


class BatchStream(IterableDataset):
    """What the training and evaluation streams share: epochs, the resume position, and
    batches collated with their cursor and skip counts (see ShardedSamples)."""

    def __init__(
        self, collate: Callable[[list[dict]], dict], batch_size: int, rank: int, seed: int
    ) -> None:
        super().__init__()
        self.collate, self.batch_size, self.rank, self.seed = collate, batch_size, rank, seed
        self.epoch = -1
        self.done: dict[int, int] = {}  # worker -> batches of the next epoch to rebuild unseen
        self.first = 0  # the stream worker that loader worker 0 plays in the next epoch

    def start(self, epoch: int, done: Mapping[int, int], first: int = 0) -> None:
        """Make the next iteration epoch `epoch`, each stream worker resuming after its
        first `done[worker]` batches, loader worker i playing stream worker first + i (set
        before the loader's workers copy the dataset)."""
        self.epoch, self.done, self.first = epoch - 1, dict(done), first

    @property
    def skipped(self) -> Counter[str]:
        """Reason -> samples skipped so far (in this process)."""
        raise NotImplementedError

    def next_epoch(self) -> tuple[int, int, int]:
        """Start the next epoch in this loader worker: (the stream worker it plays, the
        number of workers, batches of it to rebuild unseen)."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.first) % num_workers
        self.epoch += 1
        done, self.done, self.first = self.done.get(worker, 0), {}, 0
        return worker, num_workers, done

    def batched(
        self,
        chunks: Iterator[tuple[str | None, list[dict]]],
        where: str,
        worker: int,
        done: int,
    ) -> Iterator[dict]:
        """Collated (source, samples) chunks; the first `done` are rebuilt but not yielded
        (resume), and the samples skipped while rebuilding them are not reported again."""
        reported, usable = self.skipped.copy(), 0
        for number, (source, batch) in enumerate(chunks, start=1):
            usable += len(batch)
            if number > done:
                out = self._collate(batch, reported, (self.epoch, worker, number))
                if source is not None:
                    out["source"] = source
                yield out
            reported = self.skipped.copy()
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


class ShardedSamples(BatchStream):
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
        name: str = "",
    ) -> None:
        super().__init__(collate, batch_size, rank, seed)
        if sizes is None and not (resampled and batches_per_rank):
            raise ConfigError("per-shard sizes are needed unless resampling a fixed epoch")
        self.urls, self.sizes = list(urls), None if sizes is None else list(sizes)
        self.decoder, self.batches_per_rank, self.world_size = decoder, batches_per_rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.resampled, self.strict = resampled, strict
        self.name = name  # the source's name in a mix (MixedSamples), else ""
        self.split_key = KeySplitter(decoder.extensions)
        self.skip = SkipPolicy(strict)  # counts skipped samples by reason, or raises

    @property
    def skipped(self) -> Counter[str]:
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
        worker, num_workers, done = self.next_epoch()
        samples, wanted = self.samples(worker, num_workers)
        if wanted == 0:
            return
        chunks = chunked(itertools.islice(samples, wanted), self.batch_size)
        yield from self.batched(((None, b) for b in chunks), self.where(worker), worker, done)

    def where(self, worker: int) -> str:
        source = f"data.sources.{self.name} " if self.name else ""
        return f"{source}rank {self.rank} worker {worker} epoch {self.epoch}"

    def samples(self, worker: int, num_workers: int) -> tuple[Iterator[dict], int]:
        """This worker's decoded samples of the current epoch, and how many it yields
        (resampled streams go on past that number)."""
        stream = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        if self.name:  # each source of a mix draws its own shards
            stream = f"{self.name}-{stream}"
        rng = random.Random(stream)
        if self.resampled:
            lo, hi = split_range(self.batches_per_rank, num_workers, worker)
            raw, wanted = self.resampled_stream(rng), (hi - lo) * self.batch_size
        else:
            start, stop = self.sample_range(worker, num_workers)
            raw, wanted = self.range_stream(start, stop), stop - start
        if self.shuffle:
            raw = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer // 4, rng=rng)(raw)
        samples = self.decoded(raw, random.Random(f"augment-{stream}").getrandbits(62))
        if self.batches_per_rank is not None and not self.resampled:
            samples = self.exactly(samples, wanted, self.where(worker))
        return samples, wanted


def source_of_batch(
    seed: int, epoch: int, worker: int, number: int, weights: Mapping[str, float]
) -> str:
    """The source of batch `number` of stream worker `worker` in `epoch`, drawn by weight
    from a generator seeded by these alone (not the rank): every rank trains the same
    source at each step, so the modalities and objectives of a step, and the shapes DDP's
    collectives exchange, match across ranks."""
    rng = random.Random(f"source-{seed}-{epoch}-{worker}-{number}")
    return rng.choices(list(weights), list(weights.values()))[0]


class MixedSamples(BatchStream):
    """Batches from several sources (open_clip's `::` with upsampling factors, per batch):
    each batch holds the samples of one source, chosen by `weights`
    (`source_of_batch`). Every source is a resampled ShardedSamples with its own name,
    decoder and shards; the epoch is `batches_per_rank` batches of any sources. Each batch
    carries `source`. Resume rebuilds the batches before the cursor, as ShardedSamples."""

    def __init__(self, sources: Mapping[str, ShardedSamples], weights: Mapping[str, float]):
        first = next(iter(sources.values()))
        super().__init__(first.collate, first.batch_size, first.rank, first.seed)
        for name, source in sources.items():
            if not (source.resampled and source.batches_per_rank == first.batches_per_rank):
                raise ValueError(f"source {name}: mixed sources are resampled, equal epochs")
            if source.name != name:
                raise ValueError(f"source {name} is named {source.name!r}")
        if sorted(weights) != sorted(sources) or min(weights.values()) <= 0:
            raise ConfigError(f"data.sources: weights {dict(weights)} must be > 0, one per source")
        self.sources, self.weights = dict(sources), dict(weights)
        self.batches_per_rank = first.batches_per_rank

    @property
    def skipped(self) -> Counter[str]:
        return sum((s.skipped for s in self.sources.values()), Counter())

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers, done = self.next_epoch()
        lo, hi = split_range(self.batches_per_rank, num_workers, worker)
        if hi == lo:
            return
        streams = {}
        for name, source in self.sources.items():
            source.epoch = self.epoch
            streams[name] = source.samples(worker, num_workers)[0]

        def chunks() -> Iterator[tuple[str, list[dict]]]:
            for number in range(1, hi - lo + 1):
                name = source_of_batch(self.seed, self.epoch, worker, number, self.weights)
                yield name, list(itertools.islice(streams[name], self.batch_size))

        where = f"data.sources, rank {self.rank} worker {worker} epoch {self.epoch}"
        yield from self.batched(chunks(), where, worker, done)
