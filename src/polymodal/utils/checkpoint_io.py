"""Checkpoint files that survive a kill at any moment.

Lightning's TorchCheckpointIO serialises to memory and writes through an fsspec
transaction: a temp file from `tempfile.mkstemp()` (in `$TMPDIR`), moved to the path on
commit with `shutil.move`. When `$TMPDIR` is on another filesystem (a node-local temp
dir, a shared checkpoint dir) that move is a copy into the final path, so a kill during
it leaves a truncated checkpoint; nothing is fsynced either. `AtomicCheckpointIO` writes
next to the path instead (`polymodal.utils.files.atomic_file`) and keeps the checkpoint it
replaces as `<name>-previous.ckpt`, so a resume can fall back to it.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from polymodal.utils.files import atomic_file, temp_path

log = logging.getLogger(__name__)
PREVIOUS_SUFFIX = "-previous"


def previous_path(path: str | Path) -> Path:
    """Where `AtomicCheckpointIO` keeps the checkpoint that `path` replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_SUFFIX}{path.suffix}")


def keep_previous(path: Path) -> None:
    """Hard-link a complete checkpoint at `path` to its `previous_path` (replacing the one
    there), so both names always point to complete files. A truncated file (no zip
    directory at its end: left by a crash of an older writer) is not kept over a good one."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return
    previous = previous_path(path)
    link = temp_path(previous)
    try:
        os.link(path, link)
    except OSError as err:  # a filesystem without hard links: resume still finds one
        log.warning("cannot keep %s as %s (%s): renaming it instead", path, previous, err)
        os.replace(path, previous)
        return
    os.replace(link, previous)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic whatever `$TMPDIR` is, and keep the
    checkpoint they overwrite as `<name>-previous.ckpt` (remote URLs: Lightning's save)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keep_previous(path)
        with atomic_file(path, "wb") as f:
            torch.save(checkpoint, f)
