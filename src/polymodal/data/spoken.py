"""Synthesised speech-transcript dataset ("spoken") written as webdataset shards.

Every clip is espeak-ng saying a digit string ("three one four") or a short attribute phrase
("a small red circle on the left") in one of several English voices, at a random speed and
pitch, over white background noise; its transcript is the lower-case words. A transcript's
split follows from a hash of the string alone, so no val or test transcript is ever heard in
training: a recogniser is scored on word sequences it has not memorised.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import itertools
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from polymodal.data.shapes import ensure_dataset
from polymodal.data.tokenizer import train_tokenizer
from polymodal.data.writing import (
    SPLITS,
    add_sample,
    atomic_tar,
    encode_flac,
    locks_dataset,
    plan_shards,
    run_shard_jobs,
    sample_rng,
    write_json,
)
from polymodal.utils.errors import ConfigError
from polymodal.utils.files import remove_stale_temps

GENERATOR_VERSION = 1

SHARD_PREFIX = "spoken-"
KINDS = ("digits", "phrase")

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_COUNTS = (2, 5)  # fewest and most digits in a digit string
SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
PHRASE_TEMPLATES = (
    "a {size} {color} {shape}",
    "a {color} {shape} {place}",
    "a {size} {color} {shape} {place}",
    "the {shape} is {color}",
    "the {color} {shape} is {size}",
    "{color} {shape} {place}",
)
_DIGITS_PROB = 0.5
_ARTICLE = re.compile(r"\ba (?=[aeiou])")

# English voices of Debian's espeak-ng-data, some with a voice variant (+f female, +m male);
# each sounds different (espeak-ng 1.51 silently ignores a variant on some, e.g. en-gb+f3).
VOICES = (
    "en-us",
    "en-us+f2",
    "en-us+f4",
    "en-us+m3",
    "en",
    "en+f3",
    "en+m1",
    "en+m7",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
)
SPEED_WPM = (140, 200)  # espeak-ng -s, words per minute (its default is 175)
PITCH = (25, 75)  # espeak-ng -p, 0..99 (its default is 50)
NOISE_DBFS = (-65.0, -35.0)  # RMS of the white background noise, dB relative to full scale
PEAK = 0.5  # speech peak (-6 dBFS) before the noise is added, so the sum never clips
SILENCE = 0.01  # espeak-ng's level (-40 dBFS) below which its trailing pause begins
TAIL_SECONDS = 0.15  # pause kept after the last word (espeak-ng appends 0.25-0.5 s)
MAX_SECONDS = 3.0
_ESPEAK_TIMEOUT_S = 30
_INSTALL_HINT = "install Debian's espeak-ng (apt-get install espeak-ng)"

SPLIT_RULE = (
    "sha256 of the utf-8 transcript, first 8 bytes as a big-endian integer, mod 100: "
    "0-9 val, 10-19 test, 20-99 train; each split draws only its own transcripts"
)


def transcript_split(text: str) -> str:
    """The split a transcript belongs to (`SPLIT_RULE`): a function of the string alone, so
    it holds for every seed and dataset size."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    return "val" if bucket < 10 else "test" if bucket < 20 else "train"


def _phrase(template: str, size: str, color: str, shape: str, place: str) -> str:
    return _ARTICLE.sub("an ", template.format(size=size, color=color, shape=shape, place=place))


def _candidate(rng: np.random.Generator) -> tuple[str, str]:
    """A transcript drawn from all splits' transcripts, and its kind."""
    if rng.random() < _DIGITS_PROB:
        count = int(rng.integers(DIGIT_COUNTS[0], DIGIT_COUNTS[1] + 1))
        return " ".join(DIGITS[i] for i in rng.integers(len(DIGITS), size=count)), "digits"
    template = PHRASE_TEMPLATES[rng.integers(len(PHRASE_TEMPLATES))]
    words = (str(rng.choice(values)) for values in (SIZES, COLORS, SHAPES, PLACES))
    return _phrase(template, *words), "phrase"


def draw_transcript(rng: np.random.Generator, split: str) -> tuple[str, str]:
    """A transcript of `split`'s own pool and its kind: candidates of other splits are
    drawn again, so each kind keeps its share in every split."""
    while True:
        text, kind = _candidate(rng)
        if transcript_split(text) == split:
            return text, kind


def all_transcripts() -> Iterator[tuple[str, str]]:
    """Every distinct transcript once, with its kind (for the pool sizes in the manifest)."""
    for count in range(DIGIT_COUNTS[0], DIGIT_COUNTS[1] + 1):
        for digits in itertools.product(DIGITS, repeat=count):
            yield " ".join(digits), "digits"
    words = itertools.product(PHRASE_TEMPLATES, SIZES, COLORS, SHAPES, PLACES)
    for phrase in sorted({_phrase(*choice) for choice in words}):
        yield phrase, "phrase"


def require_espeak() -> None:
    """Fail in one line, before any work, where espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        raise ConfigError(f"spoken: espeak-ng is not on PATH; {_INSTALL_HINT}")


def espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's mono speech for `text` (float32 in [-1, 1]) and its sample rate. The text
    is one argument, never parsed by a shell; the same arguments give the same samples."""
    command = ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text]
    result = subprocess.run(command, check=True, capture_output=True, timeout=_ESPEAK_TIMEOUT_S)
    speech, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    return speech, rate


def render_clip(rng: np.random.Generator, text: str, sample_rate: int) -> tuple[np.ndarray, dict]:
    """A noisy clip of `text` as 16-bit samples at `sample_rate`, and how it was made
    (voice, speed, pitch, noise_db, seconds), all drawn from `rng`."""
    voice = str(rng.choice(VOICES))
    speed = int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1))
    pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
    noise_db = round(float(rng.uniform(*NOISE_DBFS)), 1)
    speech, rate = espeak(text, voice, speed, pitch)
    last_loud = np.flatnonzero(np.abs(speech) > SILENCE)[-1]
    speech = speech[: last_loud + 1 + round(TAIL_SECONDS * rate)]
    common = gcd(sample_rate, rate)
    speech = resample_poly(speech, sample_rate // common, rate // common)
    speech *= PEAK / np.abs(speech).max()
    noise = 10 ** (noise_db / 20) * rng.standard_normal(len(speech))
    pcm = np.clip(np.rint((speech + noise) * 32767), -32768, 32767).astype(np.int16)
    seconds = len(pcm) / sample_rate
    if seconds > MAX_SECONDS:  # the vocabulary and SPEED_WPM are chosen so this never happens
        raise RuntimeError(f"spoken: {text!r} ({voice}, {speed} wpm) lasts {seconds:.2f} s")
    meta = {"voice": voice, "speed": speed, "pitch": pitch, "noise_db": noise_db}
    return pcm, {**meta, "seconds": round(seconds, 3)}


def _write_shard(
    path: Path, split: str, start: int, count: int, seed: int, sample_rate: int
) -> list[tuple[str, str]]:
    """Write one shard atomically (tmp file + rename) and return its (transcript, kind)s."""
    transcripts = []
    with atomic_tar(path) as tar:
        for index in range(start, start + count):
            rng = sample_rng(seed, split, index)
            text, kind = draw_transcript(rng, split)
            pcm, meta = render_clip(rng, text, sample_rate)
            flac = encode_flac(pcm, sample_rate)
            meta = {"text": text, "kind": kind, **meta}
            add_sample(tar, f"{split}_{index:08d}", "flac", flac, text, meta)
            transcripts.append((text, kind))
    return transcripts


def _heldout(drawn: dict[str, list[tuple[str, str]]]) -> dict:
    """The split rule, each split's pool of possible transcripts and what was drawn from it."""
    pool = Counter((transcript_split(text), kind) for text, kind in all_transcripts())
    return {
        "rule": SPLIT_RULE,
        "pool": {split: {kind: pool[split, kind] for kind in KINDS} for split in SPLITS},
        "drawn": {
            split: {
                "distinct_transcripts": len({text for text, _ in pairs}),
                **{kind: sum(k == kind for _, k in pairs) for kind in KINDS},
            }
            for split, pairs in drawn.items()
        },
    }


def _espeak_version() -> str:
    """The synthesiser's version line: the clips are byte-identical only with the same one."""
    result = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True)
    return result.stdout.split("Data at")[0].strip()


@locks_dataset
def write_spoken(
    out_dir: str | Path,
    num_train: int = 8_000,
    num_val: int = 500,
    num_test: int = 500,
    sample_rate: int = 16_000,
    shard_size: int = 1_000,
    seed: int = 0,
    vocab_size: int = 1000,
    workers: int | None = None,
) -> dict:
    """Synthesise all splits, their sizes.json files, the tokenizer and the manifest.

    The manifest is written last, so its presence marks a complete dataset. ``workers=None``
    uses up to two processes; the output is byte-identical for any worker count (with the
    same espeak-ng). Runs under the directory's lock (`locks_dataset`).
    """
    if num_train < 1 or shard_size < 1 or sample_rate < 1 or min(num_val, num_test) < 0:
        raise ConfigError(
            "spoken: num_train, shard_size and sample_rate must be positive, "
            "num_val and num_test >= 0"
        )
    require_espeak()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    remove_stale_temps(out_dir)

    counts = {"train": num_train, "val": num_val, "test": num_test}
    jobs, splits = plan_shards(out_dir, counts, shard_size, SHARD_PREFIX)
    write_shard = functools.partial(_write_shard, seed=seed, sample_rate=sample_rate)
    results = run_shard_jobs(write_shard, jobs, workers)
    drawn: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for job, pairs in zip(jobs, results, strict=True):
        drawn[job.split] += pairs
    train_tokenizer([text for text, _ in drawn["train"]], out_dir / "tokenizer.json", vocab_size)

    manifest = {
        "name": "spoken",
        "params": _params(
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            sample_rate=sample_rate,
            shard_size=shard_size,
            seed=seed,
            vocab_size=vocab_size,
        ),
        "splits": splits,
        "audio": {"format": "flac", "subtype": "PCM_16", "channels": 1, "max_seconds": MAX_SECONDS},
        "synthesiser": _espeak_version(),
        "voices": list(VOICES),
        "speed_wpm": list(SPEED_WPM),
        "pitch": list(PITCH),
        "noise_dbfs": list(NOISE_DBFS),
        "words": sorted({word for text, _ in all_transcripts() for word in text.split()}),
        "heldout": _heldout(drawn),
        "tokenizer": "tokenizer.json",
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _params(
    num_train: int,
    num_val: int,
    num_test: int,
    sample_rate: int,
    shard_size: int,
    seed: int,
    vocab_size: int,
) -> dict:
    """Everything that determines the generated bytes (the worker count does not)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "sample_rate": sample_rate,
        "shard_size": shard_size,
        "seed": seed,
        "vocab_size": vocab_size,
    }


def ensure_spoken(out_dir: str | Path, **kwargs) -> dict:
    """Return the existing manifest if it was generated with the same parameters, else generate.

    Accepts the keyword arguments of ``write_spoken`` (see ``shapes.ensure_dataset``).
    """
    out_dir = Path(out_dir)
    bound = inspect.signature(write_spoken).bind(out_dir, **kwargs)
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "workers")}
    return ensure_dataset(out_dir, _params(**arguments), lambda: write_spoken(out_dir, **kwargs))
