"""`polymodal-data verify` and `inspect`: read shards back the way training will."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from polymodal.data.datamodule import (
    DEFAULT_MAX_CAPTION_BYTES,
    DEFAULT_MAX_PIXELS,
    IMAGE_KEYS,
    KeySplitter,
)
from polymodal.data.tario import read_samples

IMAGE_EXTENSIONS = IMAGE_KEYS
TEXT_EXTENSIONS = ("txt", "caption")
# keys may contain dots when the member ends in a known extension, as in training
split_key = KeySplitter((*IMAGE_EXTENSIONS, *TEXT_EXTENSIONS, "json"))


def samples(
    shard: str, read: Collection[str] | None = None, max_bytes: int | None = None
) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """(key, {extension: bytes}, error) per sample, keys split as training splits them
    (see `tario.read_samples`)."""
    return read_samples(shard, split_key, read, max_bytes)


def sample_problems(members: dict[str, bytes]) -> list[str]:
    """What is wrong with one sample (empty list when it is fine)."""
    problems = []
    images = [e for e in IMAGE_EXTENSIONS if e in members]
    if not images:
        problems.append("no image member")
    else:
        try:
            with Image.open(io.BytesIO(members[images[0]])) as image:
                width, height = image.size  # training's limit, checked before decoding
                if width * height > DEFAULT_MAX_PIXELS:
                    problems.append(f"{width}x{height} image > {DEFAULT_MAX_PIXELS} px")
                else:
                    image.load()
        except Exception as err:  # noqa: BLE001 - any decode failure is corruption
            problems.append(f"corrupt .{images[0]} ({type(err).__name__})")
    texts = [e for e in TEXT_EXTENSIONS if e in members]
    if not texts:
        problems.append("no caption member")
    elif len(members[texts[0]]) > DEFAULT_MAX_CAPTION_BYTES:
        problems.append(f"caption of {len(members[texts[0]])} bytes > {DEFAULT_MAX_CAPTION_BYTES}")
    else:
        try:
            if not members[texts[0]].decode("utf-8").strip():
                problems.append("empty caption")
        except UnicodeDecodeError:
            problems.append("caption is not UTF-8")
    if "json" in members:
        try:
            json.loads(members["json"])
        except ValueError:
            problems.append("corrupt .json")
    return problems


def verify(shards: Sequence[str]) -> tuple[int, list[str]]:
    """(good samples, ["shard:key: problem", ...]) over every sample of every shard."""
    good, reports = 0, []
    for shard in shards:
        for key, members, error in samples(shard):
            problems = [error] if error else sample_problems(members)
            if problems:
                reports.append(f"{shard}:{key}: {'; '.join(problems)}")
            else:
                good += 1
    return good, reports


def inspect(shards: Sequence[str], show: int = 5) -> dict:
    """Counts, member extensions, a few samples (caption, image size), and the bad samples
    (as `verify` finds them) counted by problem with the first `show` of them named;
    unlike `verify` a bad sample is only counted."""
    per_shard, extensions, examples = {}, Counter(), []
    problems, bad_samples = Counter(), []
    for shard in shards:
        count = 0
        for key, members, error in samples(shard):
            found = [error] if error else sample_problems(members)
            if found:
                problems.update(found)
                bad_samples.append(f"{shard}:{key}")
                continue
            count += 1
            extensions.update(members.keys())
            if len(examples) < show:
                examples.append(describe(key, members))
        per_shard[shard] = count
    return {
        "shards": len(shards),
        "samples": sum(per_shard.values()),
        "per_shard": per_shard,
        "extensions": dict(extensions),
        "examples": examples,
        "bad": len(bad_samples),
        "problems": dict(problems),
        "bad_samples": bad_samples[:show],
    }


def describe(key: str, members: dict[str, bytes]) -> dict:
    text = next((members[e] for e in TEXT_EXTENSIONS if e in members), b"")
    entry = {"key": key, "caption": text.decode("utf-8", errors="replace").strip()}
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is not None:
        with Image.open(io.BytesIO(image)) as img:
            entry["image_size"] = list(img.size)
    if "json" in members:
        entry["json"] = json.loads(members["json"])
    return entry


def contact_sheet(shards: Sequence[str], path: Path, count: int = 16, thumb: int = 128) -> int:
    """A PNG grid of the first `count` images with their captions; returns how many."""
    tiles = []
    for shard in shards:
        for _, members, error in samples(shard):
            if error or len(tiles) == count:
                continue
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            text = next((members[e] for e in TEXT_EXTENSIONS if e in members), b"")
            if image is not None and not sample_problems(members):
                tile = Image.open(io.BytesIO(image)).convert("RGB")
                tile.thumbnail((thumb, thumb))
                tiles.append((tile, text.decode("utf-8", errors="replace").strip()))
        if len(tiles) == count:
            break
    columns = 4
    rows = max(1, -(-len(tiles) // columns))
    caption_height = 36
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, caption) in enumerate(tiles):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + caption_height)
        sheet.paste(tile, (x, y))
        words, lines = caption.split(), [""]
        for word in words:  # wrap at ~20 characters, two lines at most
            if len(lines[-1]) + len(word) > 20:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((x + 2, y + thumb + 2), "\n".join(lines[:2]), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return len(tiles)
