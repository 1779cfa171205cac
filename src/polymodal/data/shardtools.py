"""What training needs from shards written by any tool, read from the shards themselves:
sample counts (`sizes.json`), a tokenizer trained on their captions, the distinct values
of a label field (zero-shot class names). `polymodal-data count|tokenizer|values`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from polymodal.data.meta import label_name, sorted_labels
from polymodal.data.shards import (
    DEFAULT_MAX_CAPTION_BYTES,
    count_samples,
    expand_shards,
    read_samples,
)
from polymodal.data.tokenizer import train_tokenizer
from polymodal.data.writing import write_json
from polymodal.utils.errors import ConfigError


def write_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Count each shard's samples from its tar headers and record them in the `sizes.json`
    beside it (open_clip's convention; entries of other shards there are kept)."""
    counts = {url: count_samples(url) for url in urls}
    for directory in {Path(url).parent for url in urls}:
        path = directory / "sizes.json"
        sizes = json.loads(path.read_text()) if path.exists() else {}
        sizes.update({Path(u).name: n for u, n in counts.items() if Path(u).parent == directory})
        write_json(path, sizes)
    return counts


def captions(urls: Sequence[str], text_keys: Sequence[str]) -> Iterator[str]:
    """Each sample's caption: its first member among `text_keys` (extensions), stripped."""
    for url in urls:
        for _, members, error in read_samples(
            url, read=text_keys, max_bytes=DEFAULT_MAX_CAPTION_BYTES
        ):
            text = next((members[k] for k in text_keys if k in members), None) if members else None
            if error is None and text:
                yield text.decode("utf-8", errors="replace").strip()


def caption_tokenizer(
    urls: Sequence[str], out: str | Path, vocab_size: int, text_keys: Sequence[str], where: str
) -> tuple[Tokenizer, int]:
    """A BPE tokenizer.json trained at `out` on the captions of `urls`, and how many
    captions it read (`where` names the shards in the error when there are none)."""
    texts = list(captions(urls, text_keys))
    if not texts:
        raise ConfigError(f"{where}: no caption member ({' '.join(text_keys)})")
    return train_tokenizer(texts, out, vocab_size), len(texts)


def field_values(urls: Sequence[str], field: str, members: bool = True) -> Counter[str]:
    """How many samples hold each value of the json `field`; with `members`, a sample
    without it counts the text of its `{key}.{field}` member instead (webdataset's `.cls`)."""
    counts: Counter[str] = Counter()
    for url in urls:
        for key, sample, error in read_samples(
            url, read=("json", field), max_bytes=DEFAULT_MAX_CAPTION_BYTES
        ):
            if error is not None:
                continue
            labels = sample_json(sample, url, key) if "json" in sample else {}
            value = label_name(labels.get(field))
            if value is None and members and field in sample:
                value = sample[field].decode("utf-8", errors="replace").strip()
            if value is not None:
                counts[value] += 1
    return counts


def sample_json(sample: dict[str, bytes], url: str, key: str) -> dict:
    """A sample's `{key}.json` object; one ConfigError line naming the shard and key when
    it is not a json object."""
    try:
        value = json.loads(sample["json"])
    except ValueError as err:  # not UTF-8, or not json
        raise ConfigError(f"{url}: {key}.json: not json ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{url}: {key}.json: expected a json object, got {type(value).__name__}")
    return value


def values_reader(shards: str | Sequence[str] | None, where: str) -> Callable[[str], list[str]]:
    """`values(attribute)`: the sorted distinct values of the json `attribute` in `shards`
    (`where` is their config field), read when called (zero-shot `classes: values`)."""

    def values(attribute: str) -> list[str]:
        if shards is None:
            raise ConfigError(f"{where}: unset, but zero-shot classes 'values' are read there")
        return sorted_labels(field_values(expand_shards(shards, where), attribute, members=False))

    return values
