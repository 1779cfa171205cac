"""Reading webdataset tar shards: the one reader behind training, `check_usable`, the
`polymodal-data` tools (verify, inspect, count, tokenizer, values) and
`Polymodal.read_shards`.

- which shards: `expand_shards` (brace ranges, globs, `::`, lists; one ConfigError line
  naming the config field) and `shard_sizes` (sizes.json, img2dataset's *_stats.json,
  else counted from tar headers)
- which members form a sample: `KeySplitter` (keys may contain dots), `IMAGE_KEYS`,
  `TEXT_KEYS`, `META_KEY`
- raw samples: `tar_samples` (any webdataset URL, errors to a handler; what training
  streams) and `read_samples` (a local tar member by member: only the extensions asked
  for are loaded, members over `max_bytes` left unread; what counting and verify use)
- what a usable sample is: `SampleDecoder` (raises SkippedSample with a reason), and the
  error policy `SkipPolicy` (raise in strict mode, else count by reason and go on);
  `decoded_samples` puts them together
"""

from __future__ import annotations

import glob
import io
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path

import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from polymodal.data.audio import AudioClips
from polymodal.utils.errors import ConfigError, SkippedSample

log = logging.getLogger(__name__)

# the members holding a sample's image, caption and metadata: the first one present is
# used. `caption` is what some writers (and older webdataset examples) call the caption
# member; img2dataset and polymodal-data build write `txt`.
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
TEXT_KEYS = ("txt", "caption")
META_KEY = "json"
MODALITIES = ("image", "audio", "text")
DEFAULT_EXTENSIONS = (*IMAGE_KEYS, *TEXT_KEYS, META_KEY)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold
DEFAULT_MAX_CAPTION_BYTES = 65_536  # ~10k words: far past any text tower's context


def _expand_one(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?["):
        return sorted(glob.glob(pattern))
    return wds.shardlists.expand_urls(pattern)


def expand_shards(pattern: str | Sequence[str], field: str) -> list[str]:
    """Expand shard patterns and check the shards exist.

    Accepts brace ranges (`a-{000000..000009}.tar`), globs (`train/*.tar`), `::`-joined
    patterns, or a list of any of these.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [url for p in patterns for part in p.split("::") for url in _expand_one(part)]
    missing = [u for u in urls if "://" not in u and not Path(u).exists()]
    if not urls or len(missing) == len(urls):
        raise ConfigError(f"{field}: no shard matches {pattern!r}")
    if missing:
        raise ConfigError(f"{field}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return urls


class KeySplitter:
    """Tar member name -> (sample key, extension). A name ending in one of `extensions`
    keeps everything before it as the key, so keys may contain dots (`img.001.jpg`);
    other names split at the first dot, as webdataset does. (A class, not a closure, so
    spawned loader workers can unpickle it.)"""

    def __init__(self, extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> None:
        self.known = sorted({e.lower() for e in extensions}, key=len, reverse=True)

    def __call__(self, name: str) -> tuple[str, str]:
        lower = name.lower()
        for extension in self.known:
            if lower.endswith("." + extension) and len(name) > len(extension) + 1:
                return name[: -len(extension) - 1], extension
        return base_plus_ext(name)


SplitKey = Callable[[str], tuple[str, str]]


def tar_samples(url: str, split_key: SplitKey, handler: Callable[[Exception], bool]):
    """Raw samples ({__key__, __url__, ext: bytes}) of one tar shard at any webdataset URL;
    an unreadable member or tar goes to `handler` (return True to go on)."""
    streams = url_opener([{"url": url}], handler=handler)
    files = tar_file_expander(streams, handler=handler)
    return group_by_keys(files, keys=split_key, handler=handler)


def read_samples(
    shard: str,
    split_key: SplitKey | None = None,
    read: Collection[str] | None = None,
    max_bytes: int | None = None,
) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """(key, {extension: bytes}, error) per sample of a local tar, consecutive members with
    one key grouped as webdataset groups them (keys split by `split_key`, by default as
    training splits them). Only the members whose extension is in `read` are loaded (None:
    all of them), so a sample count reads tar headers alone; a member over `max_bytes` (by
    its header) is left out unread, so a hostile shard cannot exhaust memory. A truncated
    or unreadable tar ends with an entry whose error says so."""
    split_key = split_key or KeySplitter()
    current, members = None, {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_key(member.name)
                if key != current and current is not None:
                    yield current, members, None
                    members = {}
                current = key
                small = max_bytes is None or member.size <= max_bytes
                if (read is None or extension in read) and small:
                    members[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        if current is not None:
            yield current, members, None
        yield "<tar>", None, f"unreadable tar ({type(err).__name__}: {err})"
        return
    if current is not None:
        yield current, members, None


def count_samples(shard: str, split_key: SplitKey | None = None) -> int:
    """Samples (distinct consecutive keys) in a local tar, from its member headers alone.
    Of a truncated tar, the samples before the damage (what a reader gets), with a warning."""
    count = 0
    for _, _, error in read_samples(shard, split_key, read=()):
        if error is None:
            count += 1
        else:
            log.warning("%s: %s; counted the %d samples before it", shard, error, count)
    return count


def shard_sizes(urls: Sequence[str], field: str, split_key: SplitKey | None = None) -> list[int]:
    """Sample count of each shard: from the `sizes.json` next to it (open_clip convention),
    else from img2dataset's `<shard>_stats.json` (`successes`), else counted from the tar's
    member headers (no decoding; `split_key` groups members into samples as training does),
    with one log line for all counted shards."""
    sizes, cache, counted = [], {}, []
    start = time.perf_counter()
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file not in cache:
            cache[sizes_file] = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
        stats_file = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
        if path.name in cache[sizes_file]:
            sizes.append(int(cache[sizes_file][path.name]))
        elif stats_file.exists():
            sizes.append(int(json.loads(stats_file.read_text())["successes"]))
        elif "://" not in url:
            sizes.append(count_samples(url, split_key))
            counted.append(sizes[-1])
        else:
            raise ConfigError(
                f"{field}: no sample count for {url} in {sizes_file} or {stats_file.name}; "
                "write a sizes.json (or stream with data.resampled=true and data.train_samples)"
            )
    if counted:
        log.info(
            "%s: no sizes.json entry for %d shard(s); counted %d samples from their tar "
            "headers in %.1fs (`polymodal-data count` writes a sizes.json)",
            field,
            len(counted),
            sum(counted),
            time.perf_counter() - start,
        )
    return sizes


class SampleDecoder:
    """Raw tar sample -> {<modality>: input, meta} for each of `modalities` (image, audio,
    text); raises SkippedSample naming shard, key and reason. `decode(members)` is the same
    check without a location (what verify reports); with `transform=None` the image is
    decoded but not transformed. Members of other modalities are left undecoded.

    Shards are input from elsewhere: an image whose header declares more than `max_pixels`
    is refused before its pixels are decoded (a 140 KB PNG can hold 144 Mpx, 1.5 GB
    decoded), a clip whose header declares more than `audio.max_seconds` likewise, and a
    caption over `max_caption_bytes` before it is tokenised.
    """

    def __init__(
        self,
        transform: Callable | None = None,
        image_keys: Sequence[str] = IMAGE_KEYS,
        text_keys: Sequence[str] = TEXT_KEYS,
        meta_key: str = META_KEY,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
        modalities: Sequence[str] = ("image", "text"),
        audio: AudioClips | None = None,
    ) -> None:
        self.transform = transform
        self.image_keys = tuple(image_keys)
        self.text_keys = tuple(text_keys)
        self.meta_key = meta_key
        self.max_pixels, self.max_caption_bytes = max_pixels, max_caption_bytes
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown or not modalities:
            raise ConfigError(f"data.modalities: {list(modalities)}; each one of {MODALITIES}")
        if "audio" in modalities and audio is None:
            raise ValueError("decoding audio needs its settings (AudioClips)")
        self.modalities, self.audio = tuple(modalities), audio

    @property
    def extensions(self) -> tuple[str, ...]:
        """Every member extension this decoder reads (for splitting keys with dots)."""
        audio = self.audio.keys if self.audio is not None else ()
        return (*self.image_keys, *audio, *self.text_keys, self.meta_key)

    def decode(self, members: Mapping[str, bytes]) -> dict:
        """{<modality>: input, meta} of one sample's members, or SkippedSample(reason,
        detail)."""
        found = {}
        for modality in self.modalities:
            keys = self.member_keys(modality)
            found[modality] = next((k for k in keys if k in members), None)
            if found[modality] is None:
                what = "caption" if modality == "text" else modality
                raise SkippedSample(f"no_{modality}", f"no {what} member ({', '.join(keys)})")
        if "text" in found:
            size = len(members[found["text"]])
            if size > self.max_caption_bytes:
                raise SkippedSample(
                    "caption_too_long",
                    f"caption of {size} bytes > data.max_caption_bytes {self.max_caption_bytes}",
                )
        decoded = {m: getattr(self, f"_{m}")(members[k], k) for m, k in found.items()}
        try:
            meta = json.loads(members[self.meta_key]) if self.meta_key in members else {}
        except ValueError as exc:
            raise SkippedSample(
                "undecodable", f"corrupt .{self.meta_key} ({type(exc).__name__})"
            ) from exc
        return {**decoded, "meta": meta}

    def member_keys(self, modality: str) -> tuple[str, ...]:
        if modality == "audio":
            return self.audio.keys
        return self.image_keys if modality == "image" else self.text_keys

    def _image(self, data: bytes, extension: str):
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size  # from the header: nothing decoded yet
                if width * height > self.max_pixels:
                    raise SkippedSample(
                        "too_many_pixels",
                        f"{width}x{height} image > data.max_pixels {self.max_pixels}",
                    )
                image = img.convert("RGB")
                return image if self.transform is None else self.transform(image)
        except SkippedSample:
            raise
        except Exception as exc:  # noqa: BLE001 - any decode failure is a bad sample
            raise SkippedSample(
                "undecodable", f"corrupt .{extension} ({type(exc).__name__})"
            ) from exc

    def _audio(self, data: bytes, extension: str):
        try:
            return self.audio.read(data)
        except SkippedSample as exc:
            raise SkippedSample(exc.reason, f".{extension}: {exc.detail}") from exc.__cause__

    def _text(self, data: bytes, extension: str) -> str:
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SkippedSample("undecodable", f"caption .{extension} is not UTF-8") from exc
        if not text:
            raise SkippedSample("empty_caption", "empty caption")
        return text

    def __call__(self, sample: dict) -> dict:
        try:
            decoded = self.decode(sample)
        except SkippedSample as exc:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
            raise SkippedSample(exc.reason, f"{where}: {exc.detail}{cause}") from exc.__cause__
        return {**decoded, "key": sample["__key__"]}


class SkipPolicy:
    """What a reader does with a bad sample or an unreadable tar (a handler: called with
    the error, returns True to go on). `strict`: raise it. Otherwise count it by reason
    (`counts`), keep the first one's message (`first`), log it unless `quiet`, and pass
    it to `record`."""

    def __init__(
        self,
        strict: bool = False,
        quiet: bool = False,
        record: Callable[[Exception], object] | None = None,
    ) -> None:
        self.strict, self.quiet, self.record = strict, quiet, record
        self.counts: Counter[str] = Counter()
        self.first: str | None = None

    def __call__(self, exc: Exception) -> bool:
        if self.strict:
            raise exc
        self.counts[getattr(exc, "reason", "unreadable")] += 1
        if self.first is None:
            self.first = str(exc)
        if self.record is not None:
            self.record(exc)
        if not self.quiet:
            log.warning("skipping bad sample: %s", exc)
        return True


def decoded_samples(
    urls: Sequence[str], decoder: SampleDecoder, skip: Callable[[Exception], bool]
) -> Iterator[dict]:
    """Decoded samples of `urls`, in shard order; bad samples and unreadable tars go to
    `skip` (a SkipPolicy)."""
    split_key = KeySplitter(decoder.extensions)
    for url in urls:
        for raw in tar_samples(url, split_key, skip):
            try:
                yield decoder(raw)
            except ValueError as exc:
                skip(exc)
