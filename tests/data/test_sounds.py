"""The sounds dataset: shards, determinism, attributes measurable in the signal, captions, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
from omegaconf import OmegaConf

from polymodal.data.cli import main
from polymodal.data.sounds import (
    ATTRIBUTES,
    ensure_sounds,
    render_clip,
    write_sounds,
    zeroshot_phrases,
)
from polymodal.evaluation.zeroshot import zeroshot_tasks
from polymodal.utils.cli import CONFIG_DIR
from tests.helpers import samples_by_key, tar_members

SMALL = {"num_train": 40, "num_val": 8, "num_test": 8, "shard_size": 16}
RATE = 16_000
FRAME = 160  # 10 ms envelope frames
PLURALS = {"buzz": "buzzes", "hiss": "hisses"}  # the others add an s
LOUDNESS_WORDS = {
    "steady": ("steady volume", "constant volume"),
    "fading in": ("fading in", "getting louder"),
    "fading out": ("fading out", "getting quieter"),
}


def _digests(root: Path) -> dict[str, str]:
    files = [*sorted(root.glob("*/*.tar")), root / "tokenizer.json"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _has(caption: str, words: str) -> bool:
    return re.search(rf"\b{words}\b", caption) is not None


def _frame_db(wave: np.ndarray) -> np.ndarray:
    """Power (dB) of each 10 ms frame."""
    frames = wave[: len(wave) // FRAME * FRAME].reshape(-1, FRAME).astype(np.float64)
    return 10 * np.log10((frames**2).mean(axis=1) + 1e-12)


def _runs(wave: np.ndarray) -> list[tuple[int, int]]:
    """Frame ranges [start, end) 6 dB above the background (the quietest frames); dips of up
    to 30 ms inside a sound (a noisy hiss) are bridged, gaps between repetitions are longer."""
    db = _frame_db(wave)
    runs: list[list[int]] = []
    for i in np.flatnonzero(db > np.percentile(db, 10) + 6):
        if runs and i - runs[-1][1] <= 3:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(start, end) for start, end in runs]


def _energy_db(wave: np.ndarray, start: int, end: int) -> float:
    """Energy (dB) of frames [start, end) and one frame either side: whole clicks, however
    they fall on the frame grid."""
    segment = wave[max(start - 1, 0) * FRAME : (end + 1) * FRAME].astype(np.float64)
    return float(10 * np.log10(np.sum(segment**2)))


def _spectrum(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and magnitudes of a Hann-windowed segment (zero-padded: fine peaks)."""
    magnitude = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), 1 << 16))
    return np.fft.rfftfreq(1 << 16, 1 / RATE), magnitude


def _peak(wave: np.ndarray) -> float:
    """The strongest frequency (Hz) between 50 Hz and 4 kHz."""
    freqs, magnitude = _spectrum(wave)
    band = (freqs > 50) & (freqs < 4000)
    return float(freqs[band][np.argmax(magnitude[band])])


def _loudest(wave: np.ndarray) -> np.ndarray:
    """The samples of the loudest repetition (a whole one, whatever the fade)."""
    start, end = max(_runs(wave), key=lambda run: _energy_db(wave, *run))
    return wave[start * FRAME : end * FRAME]


def _pitch(wave: np.ndarray, sound: str) -> float:
    """The fundamental (Hz) of a beep, buzz or chime: its strongest peak; of a chirp the
    centre of its sweep: the geometric mean of its first and last quarter's peaks."""
    segment = _loudest(wave)
    if sound != "chirp":
        return _peak(segment)
    quarter = len(segment) // 4
    return float(np.sqrt(_peak(segment[:quarter]) * _peak(segment[-quarter:])))


def _classify_sound(wave: np.ndarray) -> str:
    """Tell the sounds apart by what defines them: a click lasts one or two 10 ms frames, a
    hiss has its power in 2.5-6.5 kHz, a chirp rises, a beep is one pure tone, a buzz has
    the harmonic 2 f0 and a chime the inharmonic partial 2.76 f0."""
    segment = _loudest(wave)
    if len(segment) <= 2 * FRAME:
        return "click"
    freqs, magnitude = _spectrum(segment)
    power = magnitude**2
    if power[(freqs > 2400) & (freqs < 6600)].sum() > 0.9 * power.sum():
        return "hiss"
    half = len(segment) // 2
    if _peak(segment[half:]) > 1.25 * _peak(segment[:half]):
        return "chirp"
    f0 = _peak(segment)
    width = max(0.04 * f0, 3 * RATE / len(segment))  # Hann main lobe: 2 bins either side
    if power[np.abs(freqs - f0) < width].sum() > 0.9 * power.sum():
        return "beep"

    def near(f: float) -> float:
        return magnitude[np.abs(freqs - f) < 0.03 * f].max()

    return "buzz" if near(2 * f0) > near(2.76 * f0) else "chime"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sounds")
    return root, write_sounds(root, seed=0, workers=1, **SMALL)


@pytest.fixture(scope="module")
def clips() -> list[tuple[np.ndarray, str, dict]]:
    return [render_clip(np.random.default_rng(index)) for index in range(600)]


@pytest.fixture(scope="module")
def singles(clips: list) -> list[tuple[np.ndarray, str, dict]]:
    return [clip for clip in clips if clip[2]["num_events"] == 1]


def test_deterministic_and_worker_independent(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = dataset
    write_sounds(tmp_path / "same", seed=0, workers=2, **SMALL)
    write_sounds(tmp_path / "other", seed=1, workers=1, **SMALL)
    reference = _digests(root)
    assert len(reference) == 3 + 1 + 1 + 1
    assert _digests(tmp_path / "same") == reference
    other = _digests(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert all(other[name] != reference[name] for name in reference)


def test_shards_hold_the_rendered_clips(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    for split_index, (split, info) in enumerate(manifest["splits"].items()):
        sizes = json.loads((root / split / "sizes.json").read_text())
        assert sum(sizes.values()) == info["num_samples"]
        for name, count in sizes.items():
            samples = samples_by_key(tar_members(root / split / name))
            assert len(samples) == count
            for key, sample in samples.items():
                assert sample.keys() == {"flac", "txt", "json"}
                index = int(key.removeprefix(f"{split}_"))
                seeds = np.random.SeedSequence([0, split_index, index])
                wave, caption, attributes = render_clip(np.random.default_rng(seeds))
                decoded, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
                info = soundfile.info(io.BytesIO(sample["flac"]))
                assert (rate, info.channels, info.subtype) == (RATE, 1, "PCM_16")
                assert decoded.shape == (2 * RATE,) == wave.shape
                assert np.abs(decoded - wave).max() <= 1 / 32767
                assert sample["txt"].decode() == caption
                assert json.loads(sample["json"]) == attributes


def test_manifest(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["name"] == "sounds"
    assert manifest["splits"]["train"]["pattern"] == "train/sounds-{000000..000002}.tar"
    assert (manifest["sample_rate"], manifest["seconds"]) == (RATE, 2.0)
    assert manifest["attributes"] == {
        "sound": ["beep", "buzz", "chirp", "chime", "hiss", "click"],
        "pitch": ["low", "medium", "high"],
        "count": ["one", "two", "three", "four"],
        "duration": ["short", "long"],
        "loudness": ["steady", "fading in", "fading out"],
    }
    assert (root / manifest["tokenizer"]).is_file()


def test_waveforms_stay_in_range(clips: list) -> None:
    for wave, _, _ in clips:
        assert wave.dtype == np.float32 and wave.shape == (2 * RATE,)
        assert 0.03 < np.abs(wave).max() <= 0.5 + 0.01  # a sound peaks at <= 0.5 x gain


def test_pitch_is_the_fundamental(singles: list) -> None:
    estimates: dict[str, list[float]] = {pitch: [] for pitch in ATTRIBUTES["pitch"]}
    for wave, _, attributes in singles:
        if "pitch" in attributes:
            estimates[attributes["pitch"]].append(_pitch(wave, attributes["sound"]))
    assert all(len(values) > 40 for values in estimates.values())
    assert min(estimates["low"]) > 100 and max(estimates["low"]) < 200
    assert min(estimates["medium"]) > 320 and max(estimates["medium"]) < 580
    assert min(estimates["high"]) > 950 and max(estimates["high"]) < 1800


def test_count_and_duration_from_the_envelope(clips: list) -> None:
    for wave, caption, attributes in clips:
        runs = _runs(wave)
        if attributes["num_events"] == 2:
            assert len(runs) == 2, caption
            continue
        assert len(runs) == ATTRIBUTES["count"].index(attributes["count"]) + 1, caption
        longest = max(end - start for start, end in runs)  # the loudest repetition, if fading
        if attributes["sound"] == "click":
            assert longest <= 2, caption
        elif attributes["duration"] == "short":
            assert 4 <= longest <= 14, caption
        else:
            assert 26 <= longest <= 38, caption


def test_loudness_from_the_envelope(singles: list) -> None:
    """Repeated sounds: the last repetition against the first; one long sound (not a chime,
    which decays by itself): its last third against its first."""
    change = {"fading in": (6, 40), "fading out": (-40, -6), "steady": (-2, 2)}
    checked = 0
    for wave, caption, attributes in singles:
        runs = _runs(wave)
        if len(runs) > 1:
            (a, b), (c, d) = runs[0], runs[-1]
        elif "loudness" in attributes and attributes["sound"] != "chime":
            start, end = runs[0]
            third = (end - start) // 3
            (a, b), (c, d) = (start, start + third), (end - third, end)
        else:
            continue
        low, high = change[attributes["loudness"]]
        assert low < _energy_db(wave, c, d) - _energy_db(wave, a, b) < high, caption
        checked += 1
    assert checked > 300


def test_sound_from_its_signature(singles: list) -> None:
    for wave, caption, attributes in singles:
        assert _classify_sound(wave) == attributes["sound"], caption


def test_captions_name_the_attributes(clips: list) -> None:
    mentioned = {"pitch": 0, "duration": 0, "loudness": 0}
    labelled = {"pitch": 0, "duration": 0, "loudness": 0}
    pairs = 0
    for _, caption, attributes in clips:
        if attributes["num_events"] == 2:
            pairs += 1
            assert "sound" not in attributes and "count" not in attributes
            first, second = (event["sound"] for event in attributes["events"])
            assert caption.index(first) < caption.index(second), caption
            continue
        sound, count = attributes["sound"], attributes["count"]
        assert _has(caption, f"({sound}|{PLURALS.get(sound, sound + 's')})"), caption
        others = [c for c in ATTRIBUTES["count"] if c != count]
        assert not any(_has(caption, c) for c in others), caption
        assert _has(caption, "(a|one|a single)" if count == "one" else count), caption
        for attribute in ("pitch", "duration"):
            if attribute not in attributes:
                assert not any(_has(caption, v) for v in ATTRIBUTES[attribute]), caption
                continue
            labelled[attribute] += 1
            mentioned[attribute] += _has(caption, attributes[attribute])
            wrong = [v for v in ATTRIBUTES[attribute] if v != attributes[attribute]]
            assert not any(_has(caption, v) for v in wrong), caption
        phrases = {k: any(p in caption for p in v) for k, v in LOUDNESS_WORDS.items()}
        if "loudness" in attributes:
            labelled["loudness"] += 1
            mentioned["loudness"] += phrases.pop(attributes["loudness"])
        assert not any(phrases.values()), caption
    assert 40 < pairs < 150
    assert mentioned == labelled  # every caption names every attribute its clip has
    assert all(labelled.values())


def _first_wordings(caption: str) -> str:
    """A caption in the first of its alternative wordings (what zeroshot_phrases says)."""
    for alternative, first in (
        (r"\b(one|a single) ", "a "),
        ("-pitched", ""),
        ("at a constant volume", "at a steady volume"),
        ("getting louder", "fading in"),
        ("getting quieter", "fading out"),
        (", ", " "),
    ):
        caption = re.sub(alternative, first, caption)
    return caption


def test_zeroshot_phrases_are_what_the_captions_say(singles: list) -> None:
    """Each one-sound caption holds a phrase of its own class of every attribute it has,
    and none of another class's: the prompts average over captions as they are written."""
    phrases = {attribute: zeroshot_phrases(attribute) for attribute in ATTRIBUTES}
    for _, caption, attributes in singles:
        text = _first_wordings(caption)
        for attribute, by_class in phrases.items():
            found = {c for c, wordings in by_class.items() if any(w in text for w in wordings)}
            assert found == ({attributes[attribute]} if attribute in attributes else set()), (
                caption,
                attribute,
            )


def test_zeroshot_spec_matches_the_manifest(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    spec = OmegaConf.load(Path(CONFIG_DIR) / "zeroshot" / "sounds.yaml")
    config = OmegaConf.create({"paths": {"sounds_dir": str(root)}, "zeroshot": spec})
    spec = OmegaConf.to_container(config.zeroshot, resolve=True)
    tasks = zeroshot_tasks(spec, "data.zeroshot", values=lambda attribute: [])
    assert {a: t.classes for a, t in tasks.items()} == manifest["attributes"]
    assert {a: t.phrases for a, t in tasks.items()} == {a: zeroshot_phrases(a) for a in tasks}
    for task in tasks.values():
        assert set(task.phrases) <= set(task.classes)


def test_ensure_does_not_regenerate(tmp_path: Path) -> None:
    first = ensure_sounds(tmp_path, workers=1, **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert ensure_sounds(tmp_path, workers=1, **SMALL) == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes
    changed = ensure_sounds(tmp_path, workers=1, **{**SMALL, "num_val": 4})
    assert json.loads((tmp_path / "val" / "sizes.json").read_text()) == {"sounds-000000.tar": 4}
    assert changed["splits"]["val"]["num_samples"] == 4


@pytest.mark.parametrize("bad", [{"seconds": 1.5}, {"sample_rate": 8000}])
def test_refuses_clips_too_short_or_too_coarse(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match="sample_rate must be"):
        write_sounds(tmp_path, **{**SMALL, **bad})


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sounds", "--out", str(tmp_path), "--train", "20", "--val", "4", "--test", "4"]
    argv += ["--shard-size", "8", "--seconds", "2.5", "--workers", "1"]
    assert main(argv) == 0
    assert "sounds: train=20 val=4 test=4" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["seconds"] == 2.5 and manifest["seconds"] == 2.5
    sample = samples_by_key(tar_members(tmp_path / "train" / "sounds-000000.tar"))
    assert soundfile.info(io.BytesIO(sample["train_00000000"]["flac"])).frames == 40_000
    assert main([*argv, "--force"]) == 0
    with pytest.raises(SystemExit):  # an image option means nothing here
        main([*argv, "--image-size", "32"])
