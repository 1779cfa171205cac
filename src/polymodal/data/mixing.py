"""Preparing a mix of sources (`data.sources`): each source's dataset, then one tokenizer
trained on the captions of all of them, since every source feeds the one text tower."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from polymodal.data.shards import TEXT_KEYS, expand_shards
from polymodal.data.shardtools import caption_tokenizer
from polymodal.data.writing import dataset_lock, write_json


def shards_digest(urls: Sequence[str]) -> str:
    """Names, sizes and modification times of the shards: a regenerated dataset changes it."""
    facts = [(u, (s := Path(u).stat()).st_size, s.st_mtime_ns) for u in sorted(urls)]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


def ensure_joint_tokenizer(
    path: str | Path,
    sources: Mapping[str, Mapping],
    vocab_size: int = 1000,
    text_keys: Sequence[str] = TEXT_KEYS,
) -> Path:
    """A BPE tokenizer at `path` trained on the captions of every source's shards, trained
    again only when those shards or `vocab_size` changed (`<path>.sources.json` records
    what it was trained on)."""
    path = Path(path)
    urls = {
        name: expand_shards(spec["shards"], f"data.sources.{name}.shards")
        for name, spec in sources.items()
    }
    record = {
        "vocab_size": vocab_size,
        "sources": {name: shards_digest(u) for name, u in urls.items()},
    }
    stamp = path.with_name(path.name + ".sources.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with dataset_lock(path.parent):
        if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == record:
            return path
        every = [url for name in urls for url in urls[name]]
        caption_tokenizer(every, path, vocab_size, text_keys, "data.sources")
        write_json(stamp, record)
    return path


def prepare_sources(
    datasets: Mapping[str, Callable[[], object]],
    tokenizer: str | Path,
    sources: Mapping[str, Mapping],
    vocab_size: int = 1000,
) -> None:
    """`data.prepare` of a mix: write each built-in dataset (`datasets`: name -> its own
    prepare callable, e.g. ensure_shapes), then the joint tokenizer."""
    for prepare in datasets.values():
        prepare()
    ensure_joint_tokenizer(tokenizer, sources, vocab_size)
