"""`polymodal-data build`: webdataset shards from caption tables, COCO/Flickr caption JSON
or audio clips with a caption table.

Every input row becomes samples `{key}.jpg|png|webp` (or `{key}.flac|wav|mp3|ogg`), `{key}.txt`,
`{key}.json` (the source row, image id, original size or sample rate and duration,
license fields), or is skipped with a reason written to
`skipped.jsonl` (`--strict` makes the first one an error naming the row). Shard `i` holds
the rows `[i * shard_size, (i + 1) * shard_size)` of the input, so a build is the same for
any number of workers, and `--resume` redoes only the shards that were not finished (each
shard is written to a temp file, renamed, then recorded in `.build/`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from polymodal.data.audio import AUDIO_KEYS, DEFAULT_MAX_AUDIO_SECONDS, check_header
from polymodal.data.meta import IMAGE_ID
from polymodal.data.shards import DEFAULT_MAX_PIXELS
from polymodal.data.tokenizer import train_tokenizer
from polymodal.data.writing import add_sample, atomic_tar, dataset_lock, write_json
from polymodal.utils.cli import progress_bar
from polymodal.utils.errors import ConfigError, SkippedSample
from polymodal.utils.files import atomic_file, remove_stale_temps

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class Row:
    """One input image (or audio clip) with its captions; `position` is its index in the
    input, `media` the file's path."""

    position: int
    key: str
    media: str
    captions: list
    meta: dict = field(default_factory=dict)
    kind: str = "image"


# -- readers ---------------------------------------------------------------------------------


def read_table(path: Path) -> Iterator[dict]:
    """Rows of a CSV/TSV/JSONL/parquet file as dicts (every column kept)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        # surrogateescape keeps undecodable bytes visible, so they are reported, not lost
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ConfigError(f"{path}:{number}: not JSON ({err})") from err
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # imported here: heavy, and only parquet needs it

        yield from pq.read_table(path).to_pylist()
    else:
        raise ConfigError(f"{path}: unknown table format (csv, tsv, jsonl, parquet)")


def table_rows(
    path: Path,
    media_root: Path,
    media_column: str = "image",
    caption_column: str = "caption",
    key_column: str | None = None,
    kind: str = "image",
) -> Iterator[Row]:
    """Rows of a caption table whose `media_column` holds image (or audio) paths relative
    to `media_root`, or `file://` URLs."""
    for position, record in enumerate(read_table(path)):
        for column in (media_column, caption_column, key_column):
            if column is not None and column not in record:
                raise ConfigError(
                    f"{path}: row {position} has no column {column!r} (columns: {sorted(record)})"
                )
        media = str(record[media_column]).removeprefix("file://")
        key = str(record[key_column]) if key_column else f"{position:09d}"
        captions = [record[caption_column]]
        yield Row(position, key, str(media_root / media), captions, record, kind)


def coco_rows(path: Path, image_root: Path) -> Iterator[Row]:
    """COCO captions (`images` + `annotations`) or Karpathy-split JSON (Flickr30k/COCO):
    one row per image with all of its captions."""
    data = json.loads(path.read_text())
    images = data.get("images")
    if not isinstance(images, list):
        raise ConfigError(f"--coco {path}: no 'images' list")
    if "annotations" in data:
        captions: dict = {}
        for annotation in data["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
        for position, image in enumerate(images):
            meta = {k: v for k, v in image.items() if k != "file_name"}
            meta[IMAGE_ID] = image["id"]
            key = f"{image['id']}"
            file = str(image_root / image["file_name"])
            yield Row(position, key, file, captions.get(image["id"], []), meta)
    else:  # Karpathy format: images[*].filename, .sentences[*].raw, .imgid
        for position, image in enumerate(images):
            sentences = [s["raw"] for s in image.get("sentences", [])]
            image_id = image.get("imgid", image.get("cocoid", position))
            meta = {IMAGE_ID: image_id, "split": image.get("split")}
            folder = image_root / image.get("filepath", "")
            yield Row(position, f"{image_id}", str(folder / image["filename"]), sentences, meta)


# -- one row -> samples (runs in worker processes) ---------------------------------------------


@dataclass(frozen=True)
class Encoding:
    image_size: int | None = 256
    image_format: str = "jpg"
    max_pixels: int = DEFAULT_MAX_PIXELS
    quality: int = 95


def check_key(key: str) -> None:
    if not key or "/" in key or "\\" in key or ".." in key or key.startswith("."):
        raise SkippedSample("unsafe_key", f"key {key!r} has a path separator or '..'")
    if "." in key or "\0" in key:
        raise SkippedSample("unsafe_key", f"key {key!r} has a '.', which splits webdataset keys")


def clean_caption(caption: object) -> str:
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SkippedSample("bad_caption_encoding", f"caption is not UTF-8 ({err})") from err
    text = "" if caption is None else str(caption).strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SkippedSample("bad_caption_encoding", "caption is not UTF-8") from err
    if not text:
        raise SkippedSample("empty_caption", "caption is empty")
    return text


def encode_image(path: str, encoding: Encoding) -> tuple[bytes, tuple[int, int]]:
    """Resized (shorter side = image_size) and re-encoded image bytes, and the original size."""
    if not os.path.isfile(path):
        raise SkippedSample("missing_image", f"no file {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > encoding.max_pixels:
                raise SkippedSample(
                    "too_many_pixels", f"{path} has {width}x{height} > {encoding.max_pixels} px"
                )
            image = image.convert("RGB")
    except SkippedSample:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise SkippedSample("unreadable_image", f"{path}: {type(err).__name__}: {err}") from err
    if encoding.image_size:
        scale = encoding.image_size / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=IMAGE_FORMATS[encoding.image_format], quality=encoding.quality)
    return buffer.getvalue(), (width, height)


def read_audio(path: str) -> tuple[bytes, str, dict]:
    """The clip's bytes as they are (any extension training reads: AUDIO_KEYS), its
    extension and its properties. Its header is checked as training checks it (a small
    file may declare hours or 2^31 Hz), then the whole clip is decoded once, block by
    block, so a corrupt or truncated file is caught here without holding it in memory."""
    import soundfile  # imported here: only audio builds need libsndfile

    if not os.path.isfile(path):
        raise SkippedSample("missing_audio", f"no file {path}")
    extension = Path(path).suffix.lower().lstrip(".")
    if extension not in AUDIO_KEYS:
        raise SkippedSample("unreadable_audio", f"{path}: not one of {AUDIO_KEYS}")
    try:
        with soundfile.SoundFile(path) as clip:
            sample_rate, channels = clip.samplerate, clip.channels
            check_header(sample_rate, clip.frames, channels, DEFAULT_MAX_AUDIO_SECONDS)
            blocks = clip.blocks(blocksize=1 << 16, dtype="float32", always_2d=True)
            frames = sum(len(block) for block in blocks)
    except SkippedSample as exc:
        reason = "unreadable_audio" if exc.reason == "undecodable" else exc.reason
        raise SkippedSample(reason, f"{path}: {exc.detail}") from exc
    except (RuntimeError, soundfile.LibsndfileError, OSError) as err:
        raise SkippedSample("unreadable_audio", f"{path}: {type(err).__name__}: {err}") from err
    if frames == 0:
        raise SkippedSample("unreadable_audio", f"{path}: no audio frames")
    info = {
        "sample_rate": sample_rate,
        "channels": channels,
        "duration_s": round(frames / sample_rate, 6),
    }
    return Path(path).read_bytes(), extension, info


def row_samples(row: Row, encoding: Encoding) -> list[tuple] | SkippedSample:
    """[(key, extension, media bytes, caption, json)] for one row (one per caption), or
    why it was skipped."""
    try:
        check_key(row.key)
        captions = [clean_caption(c) for c in row.captions] or [clean_caption(None)]
        if row.kind == "audio":
            media, extension, properties = read_audio(row.media)
        else:
            media, (width, height) = encode_image(row.media, encoding)
            extension = encoding.image_format
            properties = {"original_width": width, "original_height": height}
    except SkippedSample as skipped:
        return skipped
    meta = dict(row.meta)  # every source column (written with default=str, ASCII-escaped)
    meta.setdefault(IMAGE_ID if row.kind == "image" else "clip_id", row.key)
    meta.update(properties, source_row=row.position)
    if len(captions) == 1:
        return [(row.key, extension, media, captions[0], meta)]
    return [
        (f"{row.key}_{i}", extension, media, caption, {**meta, "caption_index": i})
        for i, caption in enumerate(captions)
    ]


def _shard_samples(args: tuple[int, list[Row], Encoding]) -> tuple[int, list]:
    index, rows, encoding = args
    return index, [(row, row_samples(row, encoding)) for row in rows]


# -- the build -------------------------------------------------------------------------------


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_shards(
    rows: Iterable[Row],
    out_dir: str | Path,
    prefix: str = "shard",
    shard_size: int = 10_000,
    encoding: Encoding = Encoding(),
    workers: int = 1,
    resume: bool = False,
    strict: bool = False,
    tokenizer_vocab: int | None = None,
    total_rows: int | None = None,
) -> dict:
    """Write the shards, sizes.json, manifest.json and skipped.jsonl; returns the manifest.
    Holds the output directory's lock, so a second build into it waits (and then finds
    the shards: an error, or nothing left to do with --resume). A terminal shows a
    progress bar of rows (`total_rows`, when known)."""
    out = Path(out_dir)
    with dataset_lock(out):
        if any(out.glob(f"{prefix}-*.tar")) and not resume:
            raise ConfigError(
                f"--out {out}: already holds {prefix}-*.tar; pass --resume or empty it"
            )
        state_dir = out / ".build"
        state_dir.mkdir(parents=True, exist_ok=True)
        for directory in (out, state_dir):  # what a killed build was writing
            remove_stale_temps(directory)
        seen_keys: set[str] = set()
        shards: dict[int, dict] = {}
        chunks = _chunks(rows, shard_size)
        pending = _pending_shards(chunks, encoding, state_dir, shards, seen_keys)
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else _Serial()
        with pool, progress_bar("building shards (rows)", total_rows) as advance:
            # a few shards in flight at a time: memory stays bounded for any input size
            for window in _chunks(pending, 2 * workers):
                for index, processed in pool.map(_shard_samples, window):
                    shards[index] = _write_shard(out, prefix, index, processed, seen_keys, strict)
                    write_json(state_dir / f"{index:06d}.json", shards[index])
                    advance(len(processed))
        return _finish(out, [shards[i] for i in sorted(shards)], tokenizer_vocab)


class _Serial:
    """ProcessPoolExecutor's `map` in this process (no pool for one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn, iterable):
        return map(fn, iterable)


def _pending_shards(chunks, encoding: Encoding, state_dir: Path, shards: dict, seen_keys: set):
    """(index, rows, encoding) of every shard not finished before; finished ones (from
    `.build/`, on --resume) go straight into `shards` and `seen_keys`."""
    for index, chunk in enumerate(chunks):
        state = state_dir / f"{index:06d}.json"
        if state.exists():
            shards[index] = json.loads(state.read_text())
            seen_keys.update(shards[index]["keys"])
        else:
            yield index, chunk, encoding


def _write_shard(
    out: Path, prefix: str, index: int, processed, seen_keys: set, strict: bool
) -> dict:
    """Write one shard (temp file + rename); returns its record for `.build/` and sizes."""
    name = f"{prefix}-{index:06d}.tar"
    accepted, samples, skipped, captions = [], 0, [], []
    with atomic_tar(out / name) as tar:
        for row, result in processed:
            if not isinstance(result, SkippedSample) and row.key in seen_keys:
                result = SkippedSample("duplicate_key", f"key {row.key!r} appeared before")
            if isinstance(result, SkippedSample):
                if strict:
                    raise ConfigError(f"row {row.position} ({row.media}): {result}")
                skipped.append(
                    {
                        "row": row.position,
                        "key": row.key,
                        "file": row.media,
                        "reason": result.reason,
                        "detail": result.detail,
                    }
                )
                continue
            seen_keys.add(row.key)
            accepted.append(row.key)
            for key, extension, media, caption, meta in result:
                add_sample(tar, key, extension, media, caption, meta)
                samples += 1
                captions.append(caption)
    size = (out / name).stat().st_size
    return {
        "name": name,
        "samples": samples,
        "bytes": size,
        "keys": accepted,
        "skipped": skipped,
        "captions": captions,
    }


def _finish(out: Path, shards: list[dict], tokenizer_vocab: int | None) -> dict:
    """sizes.json, skipped.jsonl, manifest.json (and the tokenizer) from the shard records."""
    write_json(out / "sizes.json", {s["name"]: s["samples"] for s in shards})
    skipped = [entry for s in shards for entry in s["skipped"]]
    with atomic_file(out / "skipped.jsonl", "w") as f:
        f.writelines(json.dumps(entry, sort_keys=True) + "\n" for entry in skipped)
    manifest = {
        "samples": sum(s["samples"] for s in shards),
        "sources": sum(len(s["keys"]) for s in shards),
        "skipped": dict(Counter(entry["reason"] for entry in skipped)),
        "shards": {s["name"]: {"samples": s["samples"], "bytes": s["bytes"]} for s in shards},
    }
    if tokenizer_vocab:
        captions = (c for s in shards for c in s["captions"])
        train_tokenizer(captions, out / "tokenizer.json", tokenizer_vocab)
        manifest["tokenizer"] = "tokenizer.json"
    write_json(out / "manifest.json", manifest)
    return manifest
