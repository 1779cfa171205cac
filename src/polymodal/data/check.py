"""`polymodal-data verify` and `inspect`: read shards back the way training will."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import soundfile
from PIL import Image, ImageDraw

from polymodal.data.audio import AUDIO_KEYS, AudioClips, spectrogram_pixels
from polymodal.data.shards import (
    IMAGE_KEYS,
    META_KEY,
    TEXT_KEYS,
    KeySplitter,
    SampleDecoder,
    read_samples,
)
from polymodal.utils.errors import SkippedSample

# what training decodes, with training's keys and default limits, minus the transform
DECODER = SampleDecoder()


def shard_modalities(shards: Sequence[str]) -> tuple[str, str]:
    """("audio", "text") when the first sample holding an image or an audio member holds
    audio and no image, else ("image", "text"): what the shards hold, so `verify` and
    `inspect` need no flag. Only image and audio members are loaded while looking."""
    split_key = KeySplitter((*IMAGE_KEYS, *AUDIO_KEYS, *TEXT_KEYS, META_KEY))
    for shard in shards:
        for _, members, _ in read_samples(shard, split_key, read=(*IMAGE_KEYS, *AUDIO_KEYS)):
            if members:
                audio_only = not any(k in members for k in IMAGE_KEYS)
                return ("audio", "text") if audio_only else ("image", "text")
    return ("image", "text")


def decoder_for(modalities: Sequence[str]) -> SampleDecoder:
    """Training's decoder of `modalities` with its default limits; audio is read as
    evaluation reads it (the clip's start, no random crop)."""
    audio = AudioClips(train=False) if "audio" in modalities else None
    return SampleDecoder(modalities=modalities, audio=audio)


def sample_problems(members: dict[str, bytes], decoder: SampleDecoder = DECODER) -> list[str]:
    """What is wrong with one sample, as training's decoder finds it (empty list when it is
    fine): training would skip exactly the samples with a problem."""
    try:
        decoder.decode(members)
    except SkippedSample as exc:
        return [exc.detail]
    return []


def verify(shards: Sequence[str], decoder: SampleDecoder = DECODER) -> tuple[int, list[str]]:
    """(good samples, ["shard:key: problem", ...]) over every sample of every shard."""
    good, reports = 0, []
    split_key = KeySplitter(decoder.extensions)  # keys with dots split as training splits them
    for shard in shards:
        for key, members, error in read_samples(shard, split_key):
            problems = [error] if error else sample_problems(members, decoder)
            if problems:
                reports.append(f"{shard}:{key}: {'; '.join(problems)}")
            else:
                good += 1
    return good, reports


def inspect(shards: Sequence[str], show: int = 5, decoder: SampleDecoder = DECODER) -> dict:
    """Counts, member extensions, a few samples (caption, image size or clip length), and
    the bad samples (as `verify` finds them) counted by problem with the first `show` of
    them named; unlike `verify` a bad sample is only counted."""
    per_shard, extensions, examples = {}, Counter(), []
    problems, bad_samples = Counter(), []
    split_key = KeySplitter(decoder.extensions)
    for shard in shards:
        count = 0
        for key, members, error in read_samples(shard, split_key):
            found = [error] if error else sample_problems(members, decoder)
            if found:
                problems.update(found)
                bad_samples.append(f"{shard}:{key}")
                continue
            count += 1
            extensions.update(members.keys())
            if len(examples) < show:
                examples.append(describe(key, members, decoder))
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


def describe(key: str, members: dict[str, bytes], decoder: SampleDecoder = DECODER) -> dict:
    """A good sample in a line: caption, image size or clip length and rate (from the
    headers), json. Only the members `decoder` reads: others may not decode."""
    text = next((members[e] for e in decoder.text_keys if e in members), b"")
    entry = {"key": key, "caption": text.decode("utf-8", errors="replace").strip()}
    if "image" in decoder.modalities:
        image = next(members[e] for e in decoder.image_keys if e in members)
        with Image.open(io.BytesIO(image)) as img:
            entry["image_size"] = list(img.size)
    if "audio" in decoder.modalities:
        audio = next(members[e] for e in decoder.audio.keys if e in members)
        info = soundfile.info(io.BytesIO(audio))
        entry["audio_seconds"] = round(info.frames / info.samplerate, 3)
        entry["sample_rate"] = info.samplerate
    if decoder.meta_key in members:
        entry["json"] = json.loads(members[decoder.meta_key])
    return entry


def _tiles(
    shards: Sequence[str], decoder: SampleDecoder, thumb: int
) -> Iterator[tuple[Image.Image, str]]:
    """(tile, caption) of each good sample: its image as a thumbnail, else its clip's
    log-mel spectrogram (what the audio tower sees, before SpecAugment) as a square."""
    split_key = KeySplitter(decoder.extensions)
    for shard in shards:
        for _, members, error in read_samples(shard, split_key):
            if error:
                continue
            try:
                sample = decoder.decode(members)
            except SkippedSample:
                continue
            if "image" in sample:
                tile = sample["image"]
                tile.thumbnail((thumb, thumb))
            else:
                spectrogram = decoder.audio.log_mel(sample["audio"][None])
                tile = Image.fromarray(spectrogram_pixels(spectrogram)[0]).resize((thumb, thumb))
            yield tile, sample["text"]


def contact_sheet(
    shards: Sequence[str],
    path: Path,
    count: int = 16,
    thumb: int = 128,
    decoder: SampleDecoder = DECODER,
) -> int:
    """A PNG grid of the first `count` good samples' images (audio: spectrograms) with
    their captions; returns how many."""
    tiles = list(islice(_tiles(shards, decoder, thumb), count))
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
