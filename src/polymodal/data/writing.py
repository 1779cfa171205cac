"""Writing tar shards atomically and reproducibly; small JSON files; dataset locks.
(Reading shards: `polymodal.data.shards`.)"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
import sys
import tarfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from polymodal.utils.files import atomic_file, atomic_write_text, file_lock, remove_stale_temps

LOCK_NAME = ".lock"  # in a dataset directory: held while it is checked or written
SPLITS = ("train", "val", "test")
T = TypeVar("T")


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample `index` of `split`, seeded by (seed, split, index) alone, so a
    generated dataset does not depend on sharding or worker count."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def encode_flac(wave: np.ndarray, sample_rate: int) -> bytes:
    """A mono clip (float in [-1, 1] or int16) as 16-bit FLAC bytes."""
    import soundfile  # imported here: only audio datasets need libsndfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed metadata so identical content gives byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def add_sample(
    tar: tarfile.TarFile, key: str, extension: str, media: bytes, caption: str, meta: dict
) -> None:
    """One webdataset sample: `{key}.{extension}` (image/audio), `{key}.txt`, `{key}.json`."""
    add_member(tar, f"{key}.{extension}", media)
    add_member(tar, f"{key}.txt", caption.encode("utf-8"))
    add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())


@contextmanager
def atomic_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """A tar that appears at `path` only once complete (`atomic_file`), so readers never
    see a partial shard."""
    with (
        atomic_file(path) as f,
        tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        yield tar


def write_json(path: Path, data: dict | list) -> None:
    """Write JSON atomically, so readers never see half a file."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def dataset_lock(out_dir: str | Path) -> AbstractContextManager[None]:
    """Exclusive lock of a dataset directory while it is checked or written, so processes
    that prepare the same dataset at once (sweep jobs on a fresh checkout) wait for the
    first one instead of writing over each other. Re-entrant in a thread."""
    return file_lock(Path(out_dir) / LOCK_NAME)


def locks_dataset(write: Callable[..., T]) -> Callable[..., T]:
    """`write(out_dir, ...)` run under `dataset_lock(out_dir)`."""

    @functools.wraps(write)
    def locked(out_dir: str | Path, *args, **kwargs) -> T:
        with dataset_lock(out_dir):
            return write(out_dir, *args, **kwargs)

    return locked


class ShardJob(NamedTuple):
    """One shard to write: samples `start` .. `start + count - 1` of `split`, to `path`."""

    path: Path
    split: str
    start: int
    count: int


def plan_shards(
    out_dir: Path, counts: Mapping[str, int], shard_size: int, prefix: str
) -> tuple[list[ShardJob], dict[str, dict]]:
    """Cut each split's `counts[split]` samples into `{prefix}NNNNNN.tar` shards of
    `shard_size`: clear the split's old shards and temps (a smaller rerun must not leave
    extra shards behind), write its sizes.json, and return the shard jobs in `counts` order
    with each split's manifest entry."""
    jobs, splits = [], {}
    for split, total in counts.items():
        split_dir = out_dir / split
        split_dir.mkdir(exist_ok=True)
        for stale in split_dir.glob(f"{prefix}*.tar*"):  # killed writers' temps too
            stale.unlink()
        remove_stale_temps(split_dir)
        num_shards = -(-total // shard_size)
        sizes = {}
        for shard in range(num_shards):
            start = shard * shard_size
            name = f"{prefix}{shard:06d}.tar"
            sizes[name] = min(shard_size, total - start)
            jobs.append(ShardJob(split_dir / name, split, start, sizes[name]))
        write_json(split_dir / "sizes.json", sizes)
        last = max(num_shards - 1, 0)
        splits[split] = {
            "pattern": f"{split}/{prefix}{{000000..{last:06d}}}.tar" if total else None,
            "num_samples": total,
            "num_shards": num_shards,
        }
    return jobs, splits


def run_shard_jobs(
    write_shard: Callable[[Path, str, int, int], T], jobs: list[ShardJob], workers: int | None
) -> list[T]:
    """`write_shard(*job)` of every job, in job order, from up to `workers` processes
    (None: up to two); one worker runs in this process."""
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [write_shard(*job) for job in jobs]
    # Fork on Linux: spawn would re-import the caller's __main__ (a Hydra app, a notebook).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(write_shard, *zip(*jobs, strict=True)))
