"""Writing tar shards atomically and reproducibly; small JSON files; dataset locks.
(Reading shards: `polymodal.data.shards`.)"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

from polymodal.utils.files import atomic_file, atomic_write_text, file_lock

LOCK_NAME = ".lock"  # in a dataset directory: held while it is checked or written
T = TypeVar("T")


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
