"""`polymodal-data verify` and `inspect`: read shards back the way training will."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from polymodal.data.shards import IMAGE_KEYS, TEXT_KEYS, SampleDecoder, read_samples
from polymodal.utils.errors import SkippedSample

# what training decodes, with training's keys and default limits, minus the transform
DECODER = SampleDecoder()


def sample_problems(members: dict[str, bytes]) -> list[str]:
    """What is wrong with one sample, as training's decoder finds it (empty list when it is
    fine): training would skip exactly the samples with a problem."""
    try:
        DECODER.decode(members)
    except SkippedSample as exc:
        return [exc.detail]
    return []


def verify(shards: Sequence[str]) -> tuple[int, list[str]]:
    """(good samples, ["shard:key: problem", ...]) over every sample of every shard."""
    good, reports = 0, []
    for shard in shards:
        for key, members, error in read_samples(shard):
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
        for key, members, error in read_samples(shard):
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
    text = next((members[e] for e in TEXT_KEYS if e in members), b"")
    entry = {"key": key, "caption": text.decode("utf-8", errors="replace").strip()}
    image = next((members[e] for e in IMAGE_KEYS if e in members), None)
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
        for _, members, error in read_samples(shard):
            if error or len(tiles) == count:
                continue
            image = next((members[e] for e in IMAGE_KEYS if e in members), None)
            text = next((members[e] for e in TEXT_KEYS if e in members), b"")
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
