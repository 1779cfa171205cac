"""Procedurally synthesised audio-caption dataset ("sounds") written as webdataset shards.

The audio counterpart of `shapes`: every clip holds one sound (a beep, buzz, chirp, chime,
hiss or click) repeated one to four times over faint background noise, with a caption drawn
from many templates naming every attribute it has: sound, count, pitch, duration, loudness.
Each attribute is plain in a log-mel spectrogram (16 kHz, 64 bins, ~20 ms hop): the sounds
differ in spectral shape, the pitch ranges lie far apart, repetitions are separated by at
least 90 ms of silence and fades span 24 dB, so a small audio encoder learns audio-text
alignment in minutes and zero-shot evaluation builds prompts from the attribute vocabularies.
Some clips hold two different sounds in a row instead; like shapes' two-object images they
carry no top-level labels.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from pathlib import Path

import numpy as np

from polymodal.data.shapes import ensure_dataset
from polymodal.data.tokenizer import train_tokenizer
from polymodal.data.writing import (
    add_sample,
    atomic_tar,
    encode_flac,
    locks_dataset,
    plan_shards,
    run_shard_jobs,
    sample_rng,
    write_json,
)
from polymodal.utils.files import remove_stale_temps

# 2: captions name every attribute a clip has (version 1 left pitch, duration and loudness
# out of some, so many val captions fitted several clips and capped audio->text R@5 at 0.63
# even for a perfect classifier; now 0.85)
GENERATOR_VERSION = 2

SOUNDS = ("beep", "buzz", "chirp", "chime", "hiss", "click")
PITCHED = ("beep", "buzz", "chirp", "chime")  # a hiss or a click has no pitch
PITCHES = ("low", "medium", "high")
COUNTS = ("one", "two", "three", "four")
DURATIONS = ("short", "long")  # a click is always a click: no duration
LOUDNESS = ("steady", "fading in", "fading out")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "sound": SOUNDS,
    "pitch": PITCHES,
    "count": COUNTS,
    "duration": DURATIONS,
    "loudness": LOUDNESS,
}

SHARD_PREFIX = "sounds-"
MIN_SAMPLE_RATE = 16_000  # the hiss band and the partials need up to 7.2 kHz
# Fits the longest sound, four long repetitions (4 x 0.36 s + 3 x 0.15 s = 1.89 s), between
# the earliest onset (0.02 s) and the end margin (0.05 s).
MIN_SECONDS = 2.0

# Fundamental (a chirp: the centre of its sweep), log-uniform; neighbouring ranges are more
# than 1.7x apart, several mel bins at 64 bins.
_PITCH_HZ = {"low": (110.0, 190.0), "medium": (330.0, 560.0), "high": (1000.0, 1700.0)}
_DURATION_SECONDS = {"short": (0.07, 0.12), "long": (0.28, 0.36)}  # one repetition
_CLICK_SECONDS = 0.008
_GAP_SECONDS = (0.09, 0.15)  # silence between repetitions: >= 4 frames at a 20 ms hop
_PAIR_GAP_SECONDS = (0.15, 0.30)  # between the two sounds of a two-sound clip
_ONSET_SECONDS = (0.02, 0.30)
_END_MARGIN_SECONDS = 0.05
_FADE_DB = 24.0
_RAMP_SECONDS = 0.005  # raised-cosine edges, so a tone starts without a click
_CHIME_RATIOS = np.array([1.0, 2.76, 5.40, 8.93])  # the modes of a struck bar: inharmonic
_CHIME_AMPS = np.array([1.0, 0.6, 0.4, 0.25])
_CHIME_DECAY_DB = 12.0  # over one strike: clearly less than a fade
_CHIRP_SPAN = 1.6  # a chirp rises from pitch / 1.6 to pitch * 1.6
_HISS_HZ = (2500.0, 6500.0)
_CLICK_DECAY_SECONDS = 0.0015
_MAX_PARTIAL = 0.45  # of the sample rate: harmonics above it are left out (no aliasing)
_PEAK = 0.5  # every sound's peak before the random gain
_GAIN = (0.3, 1.0)
_NOISE_RMS = (0.0001, 0.001)  # background, log-uniform: -80 to -60 dBFS
_TWO_SOUND_PROB = 0.15
_PITCHED_SUFFIX_PROB = 0.3  # "high-pitched" rather than "high"
_FIRST_PHRASE_PROB = 0.7  # "fading in" rather than "getting louder"

_PLURAL = {
    "beep": "beeps",
    "buzz": "buzzes",
    "chirp": "chirps",
    "chime": "chimes",
    "hiss": "hisses",
    "click": "clicks",
}
_ONE_WORDS = ("a", "one", "a single")
_LOUDNESS_PHRASES = {
    "steady": ("at a steady volume", "at a constant volume"),
    "fading in": ("fading in", "getting louder"),
    "fading out": ("fading out", "getting quieter"),
}
# {np} is the noun phrase ("three short high beeps"), {loudness} how its volume changes;
# sounds labelled with a loudness get the templates that say it, the others the rest.
SINGLE_TEMPLATES = (
    "{np}",
    "{np} {loudness}",
    "the sound of {np}",
    "the sound of {np} {loudness}",
    "a recording of {np} {loudness}",
    "an audio clip of {np}",
    "{np} can be heard",
    "you can hear {np} {loudness}",
    "{np}, {loudness}",
    "listen to {np} {loudness}",
    "{np} {loudness} over faint background noise",
    "in this clip: {np}",
    "a clip with {np} {loudness}",
    "{np} in a quiet room",
)
_LOUDNESS_TEMPLATES = [i for i, t in enumerate(SINGLE_TEMPLATES) if "{loudness}" in t]
_UNLABELLED_TEMPLATES = [i for i, t in enumerate(SINGLE_TEMPLATES) if "{loudness}" not in t]
# {a} and {b} are the two sounds' noun phrases, in the order they are heard.
PAIR_TEMPLATES = (
    "{a} followed by {b}",
    "{a}, then {b}",
    "{a} and then {b}",
    "first {a}, then {b}",
    "the sound of {a} followed by {b}",
    "two sounds: {a} and then {b}",
    "a recording of {a} and then {b}",
)


def _sample_sound(rng: np.random.Generator, sound: str) -> dict[str, str]:
    """A sound's own attributes: pitch unless it is pitchless, duration unless a click."""
    event = {"sound": sound}
    if sound in PITCHED:
        event["pitch"] = str(rng.choice(PITCHES))
    if sound != "click":
        event["duration"] = str(rng.choice(DURATIONS))
    return event


def _sample_events(rng: np.random.Generator) -> list[dict[str, str]]:
    """One repeated sound with a count and a loudness label, or two different single sounds
    (in the order they are heard)."""
    if rng.random() < _TWO_SOUND_PROB:
        first, second = rng.choice(len(SOUNDS), size=2, replace=False)
        return [_sample_sound(rng, SOUNDS[first]), _sample_sound(rng, SOUNDS[second])]
    event = _sample_sound(rng, str(rng.choice(SOUNDS)))
    event["count"] = str(rng.choice(COUNTS))
    # a single short sound or click is one blip, too short for a fade: steady, unlabelled
    if event["count"] != "one" or event.get("duration") == "long":
        event["loudness"] = str(rng.choice(LOUDNESS))
    return [event]


def _length(rng: np.random.Generator, event: dict[str, str]) -> float:
    """Seconds of one repetition."""
    if event["sound"] == "click":
        return _CLICK_SECONDS
    return float(rng.uniform(*_DURATION_SECONDS[event["duration"]]))


def _schedule(
    rng: np.random.Generator, events: list[dict[str, str]], seconds: float
) -> list[tuple[float, list[float]]]:
    """Per sound: the length of one repetition and the start times of its repetitions."""
    lengths = [_length(rng, event) for event in events]
    if len(events) == 1:
        gap = float(rng.uniform(*_GAP_SECONDS))
        repeats = COUNTS.index(events[0]["count"]) + 1
        timing = [(lengths[0], [i * (lengths[0] + gap) for i in range(repeats)])]
    else:
        gap = float(rng.uniform(*_PAIR_GAP_SECONDS))
        timing = [(lengths[0], [0.0]), (lengths[1], [lengths[0] + gap])]
    total = max(offsets[-1] + length for length, offsets in timing)
    latest = min(_ONSET_SECONDS[1], seconds - total - _END_MARGIN_SECONDS)
    onset = float(rng.uniform(_ONSET_SECONDS[0], latest))
    return [(length, [onset + offset for offset in offsets]) for length, offsets in timing]


def _pitch(rng: np.random.Generator, event: dict[str, str]) -> float:
    """A frequency (Hz) in the pitch's range, log-uniform like musical intervals."""
    low, high = _PITCH_HZ[event["pitch"]]
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _band_noise(
    rng: np.random.Generator, n: int, sample_rate: int, band: tuple[float, float]
) -> np.ndarray:
    """White noise with everything outside `band` (Hz) removed."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0
    return np.fft.irfft(spectrum, n)


def _partials(
    t: np.ndarray, pitch: float, ratios: np.ndarray, amps: np.ndarray, sample_rate: int
) -> np.ndarray:
    """Sum of sines at `pitch * ratios`, leaving out those too high for the sample rate."""
    kept = pitch * ratios < _MAX_PARTIAL * sample_rate
    phases = 2 * np.pi * pitch * ratios[kept, None] * t
    return (amps[kept, None] * np.sin(phases)).sum(axis=0)


def _waveform(
    rng: np.random.Generator, event: dict[str, str], length: float, sample_rate: int
) -> np.ndarray:
    """One repetition of the sound, peaking at 1."""
    n = round(length * sample_rate)
    t = np.arange(n) / sample_rate
    sound = event["sound"]
    pitch = _pitch(rng, event) if sound in PITCHED else 0.0
    if sound == "beep":  # a pure tone: one spectral line
        wave = np.sin(2 * np.pi * pitch * t)
    elif sound == "buzz":  # a sawtooth: every harmonic, falling as 1/k
        harmonics = np.arange(1, int(_MAX_PARTIAL * sample_rate / pitch) + 1)
        wave = _partials(t, pitch, harmonics, 1 / harmonics, sample_rate)
    elif sound == "chirp":  # an exponential sweep: a rising diagonal line
        start, rate = pitch / _CHIRP_SPAN, np.log(_CHIRP_SPAN**2) / length
        wave = np.sin(2 * np.pi * start * np.expm1(rate * t) / rate)
    elif sound == "chime":  # inharmonic partials of a struck bar, decaying
        decay = 10 ** (-_CHIME_DECAY_DB / 20 * t / length)
        wave = _partials(t, pitch, _CHIME_RATIOS, _CHIME_AMPS, sample_rate) * decay
    elif sound == "hiss":  # high band-limited noise
        wave = _band_noise(rng, n, sample_rate, _HISS_HZ)
    else:  # click: a burst of broadband noise a few milliseconds long
        wave = rng.standard_normal(n) * np.exp(-t / _CLICK_DECAY_SECONDS)
    if sound != "click":
        wave = wave * _edges(n, round(_RAMP_SECONDS * sample_rate))
    return wave / np.abs(wave).max()


def _edges(n: int, ramp: int) -> np.ndarray:
    """Raised-cosine fade-in and fade-out of `ramp` samples each."""
    envelope = np.ones(n)
    ramp = min(ramp, n // 2)
    rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    envelope[:ramp] = rise
    envelope[n - ramp :] = rise[::-1]
    return envelope


def _loudness(loudness: str, times: np.ndarray, start: float, end: float) -> np.ndarray:
    """Gain over time: flat, or a ramp of _FADE_DB dB (linear in dB) from start to end."""
    if loudness == "steady":
        return np.ones_like(times)
    progress = np.clip((times - start) / (end - start), 0, 1)
    if loudness == "fading out":
        progress = 1 - progress
    return 10 ** (_FADE_DB * (progress - 1) / 20)


def _noun_phrase(rng: np.random.Generator, event: dict[str, str], count: str) -> str:
    """'three short high beeps': the count, the duration and pitch where it has them, the sound."""
    words = [str(rng.choice(_ONE_WORDS)) if count == "one" else count]
    if "duration" in event:
        words.append(event["duration"])
    if "pitch" in event:
        pitched = rng.random() < _PITCHED_SUFFIX_PROB
        words.append(event["pitch"] + ("-pitched" if pitched else ""))
    words.append(event["sound"] if count == "one" else _PLURAL[event["sound"]])
    return " ".join(words)


def _caption(rng: np.random.Generator, events: list[dict[str, str]]) -> tuple[str, int]:
    """Caption and template index (into SINGLE_TEMPLATES or PAIR_TEMPLATES by sound count)."""
    if len(events) == 2:
        index = int(rng.integers(len(PAIR_TEMPLATES)))
        first, second = (_noun_phrase(rng, event, "one") for event in events)
        return PAIR_TEMPLATES[index].format(a=first, b=second), index
    event = events[0]
    noun = _noun_phrase(rng, event, event["count"])
    if "loudness" not in event:
        index = int(rng.choice(_UNLABELLED_TEMPLATES))
        return SINGLE_TEMPLATES[index].format(np=noun), index
    index = int(rng.choice(_LOUDNESS_TEMPLATES))
    first, second = _LOUDNESS_PHRASES[event["loudness"]]
    loudness = first if rng.random() < _FIRST_PHRASE_PROB else second
    return SINGLE_TEMPLATES[index].format(np=noun, loudness=loudness), index


def _one_sound_events() -> list[dict[str, str]]:
    """Every labelled one-sound clip the generator can make, as its attributes."""
    events = []
    for sound in SOUNDS:
        pitches = PITCHES if sound in PITCHED else (None,)
        durations = DURATIONS if sound != "click" else (None,)
        for count, duration, pitch in itertools.product(COUNTS, durations, pitches):
            event = {"sound": sound, "count": count, "duration": duration, "pitch": pitch}
            labelled = count != "one" or duration == "long"  # as _sample_events
            for loudness in LOUDNESS if labelled else (None,):
                events.append({k: v for k, v in {**event, "loudness": loudness}.items() if v})
    return events


def zeroshot_phrases(attribute: str) -> dict[str, list[str]]:
    """Per class of `attribute`, what the captions of every one-sound clip holding it say
    ("two short high beeps fading in", in the captions' first wordings), so that a class's
    prompts average over the other attributes as its captions name them: zero-shot
    prompts in the captions' own words (the manifest's `phrases`, read by
    conf/zeroshot/sounds.yaml)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"sounds has no attribute {attribute!r} (has {list(ATTRIBUTES)})")
    phrases: dict[str, list[str]] = {value: [] for value in ATTRIBUTES[attribute]}
    for event in _one_sound_events():
        if attribute in event:
            words = [_ONE_WORDS[0] if event["count"] == "one" else event["count"]]
            words += [event[k] for k in ("duration", "pitch") if k in event]
            words.append(event["sound"] if event["count"] == "one" else _PLURAL[event["sound"]])
            if "loudness" in event:
                words.append(_LOUDNESS_PHRASES[event["loudness"]][0])
            phrases[event[attribute]].append(" ".join(words))
    return phrases


def render_clip(
    rng: np.random.Generator, sample_rate: int = 16_000, seconds: float = 2.0
) -> tuple[np.ndarray, str, dict]:
    """Synthesise one clip (float32 in [-1, 1]), its caption and its attributes.

    Top-level "sound"/"count"/"pitch"/"duration"/"loudness" keys exist only for one-sound
    clips, and only those that apply (no pitch for a hiss or a click, no duration for a
    click, no loudness for one blip), so zero-shot evaluation skips what is not there.
    """
    events = _sample_events(rng)
    clip = np.zeros(round(seconds * sample_rate), dtype=np.float32)
    gain = _PEAK * rng.uniform(*_GAIN)
    for event, (length, starts) in zip(events, _schedule(rng, events, seconds), strict=True):
        wave = gain * _waveform(rng, event, length, sample_rate)
        loudness, end = event.get("loudness", "steady"), starts[-1] + length
        for start in starts:
            first = round(start * sample_rate)
            times = (first + np.arange(len(wave))) / sample_rate
            clip[first : first + len(wave)] += wave * _loudness(loudness, times, starts[0], end)
    noise_rms = np.exp(rng.uniform(*np.log(_NOISE_RMS)))
    clip += noise_rms * rng.standard_normal(len(clip), dtype=np.float32)
    caption, template = _caption(rng, events)
    attributes: dict = {"events": events, "num_events": len(events), "template": template}
    if len(events) == 1:
        attributes.update(events[0])
    return np.clip(clip, -1, 1), caption, attributes


def _write_shard(
    path: Path, split: str, start: int, count: int, seed: int, sample_rate: int, seconds: float
) -> list[str]:
    """Write one shard atomically (tmp file + rename) and return its captions."""
    captions = []
    with atomic_tar(path) as tar:
        for index in range(start, start + count):
            rng = sample_rng(seed, split, index)
            waveform, caption, attributes = render_clip(rng, sample_rate, seconds)
            media = encode_flac(waveform, sample_rate)
            add_sample(tar, f"{split}_{index:08d}", "flac", media, caption, attributes)
            captions.append(caption)
    return captions


@locks_dataset
def write_sounds(
    out_dir: str | Path,
    num_train: int = 20_000,
    num_val: int = 1_000,
    num_test: int = 1_000,
    sample_rate: int = 16_000,
    seconds: float = 2.0,
    shard_size: int = 2_000,
    seed: int = 0,
    vocab_size: int = 1000,
    workers: int | None = None,
) -> dict:
    """Generate all splits, their sizes.json files, the tokenizer and the manifest.

    The manifest is written last, so its presence marks a complete dataset. ``workers=None``
    uses up to two processes; the output is byte-identical for any worker count. Runs under
    the directory's lock (`locks_dataset`).
    """
    if num_train < 1 or shard_size < 1 or min(num_val, num_test) < 0:
        raise ValueError("num_train and shard_size must be positive, num_val/num_test >= 0")
    if sample_rate < MIN_SAMPLE_RATE or seconds < MIN_SECONDS:
        raise ValueError(
            f"sample_rate must be >= {MIN_SAMPLE_RATE} and seconds >= {MIN_SECONDS} (the "
            f"highest sounds and the longest repetitions need them), got {sample_rate}, {seconds}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    remove_stale_temps(out_dir)

    counts = {"train": num_train, "val": num_val, "test": num_test}
    jobs, splits = plan_shards(out_dir, counts, shard_size, SHARD_PREFIX)
    write_shard = functools.partial(
        _write_shard, seed=seed, sample_rate=sample_rate, seconds=seconds
    )
    results = run_shard_jobs(write_shard, jobs, workers)
    num_train_shards = splits["train"]["num_shards"]  # train jobs come first
    train_captions = [c for captions in results[:num_train_shards] for c in captions]
    train_tokenizer(train_captions, out_dir / "tokenizer.json", vocab_size=vocab_size)

    manifest = {
        "name": "sounds",
        "params": _params(
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            sample_rate=sample_rate,
            seconds=seconds,
            shard_size=shard_size,
            seed=seed,
            vocab_size=vocab_size,
        ),
        "splits": splits,
        "attributes": {key: list(values) for key, values in ATTRIBUTES.items()},
        "phrases": {key: zeroshot_phrases(key) for key in ATTRIBUTES},
        "sample_rate": sample_rate,
        "seconds": seconds,
        "tokenizer": "tokenizer.json",
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _params(
    num_train: int,
    num_val: int,
    num_test: int,
    sample_rate: int,
    seconds: float,
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
        "seconds": seconds,
        "shard_size": shard_size,
        "seed": seed,
        "vocab_size": vocab_size,
    }


def ensure_sounds(out_dir: str | Path, **kwargs) -> dict:
    """Return the existing manifest if it was generated with the same parameters, else generate.

    Accepts the keyword arguments of ``write_sounds`` (see ``shapes.ensure_dataset``).
    """
    out_dir = Path(out_dir)
    bound = inspect.signature(write_sounds).bind(out_dir, **kwargs)
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "workers")}
    return ensure_dataset(out_dir, _params(**arguments), lambda: write_sounds(out_dir, **kwargs))
