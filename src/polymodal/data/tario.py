"""Writing tar shards and small JSON files atomically and reproducibly."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    """A tar written to `<path>.tmp` and renamed to `path` once complete, so readers never
    see a partial shard."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        yield tar
    os.replace(tmp, path)


def write_json(path: Path, data: dict | list) -> None:
    """Write JSON through a temp file and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
