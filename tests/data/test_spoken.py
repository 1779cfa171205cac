import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from polymodal.data import spoken
from polymodal.data.cli import main
from polymodal.data.spoken import VOICES, ensure_spoken, espeak, transcript_split, write_spoken
from polymodal.utils.errors import ConfigError
from tests.helpers import samples_by_key, tar_members

SMALL = {"num_train": 12, "num_val": 4, "num_test": 4, "shard_size": 5}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("*/*.tar"))
    }


def _samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("*.tar")):
        samples.update(samples_by_key(tar_members(shard)))
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("spoken")
    return root, write_spoken(root, seed=0, workers=1, **SMALL)


def test_deterministic_and_worker_independent(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = dataset
    write_spoken(tmp_path / "same", seed=0, workers=2, **SMALL)
    reference = _digests(root)
    assert len(reference) == 3 + 1 + 1
    assert _digests(tmp_path / "same") == reference
    write_spoken(tmp_path / "other", seed=1, workers=2, **SMALL)
    other = _digests(tmp_path / "other")
    assert all(other[name] != reference[name] for name in reference)


def test_samples_are_16khz_mono_speech_with_their_transcript(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    for split, info in manifest["splits"].items():
        samples = _samples(root, split)
        assert len(samples) == info["num_samples"]
        for sample in samples.values():
            assert sample.keys() == {"flac", "txt", "json"}
            meta = json.loads(sample["json"])
            assert sample["txt"].decode() == meta["text"] == meta["text"].lower()
            assert meta["kind"] in ("digits", "phrase")
            audio, rate = soundfile.read(io.BytesIO(sample["flac"]))
            flac = soundfile.info(io.BytesIO(sample["flac"]))
            assert (rate, flac.channels, flac.subtype) == (16_000, 1, "PCM_16")
            assert meta["seconds"] == round(len(audio) / rate, 3) <= spoken.MAX_SECONDS
            noise_rms = 10 ** (meta["noise_db"] / 20)
            assert np.sqrt(np.mean(audio**2)) > 2 * noise_rms  # >= 2.7 in the default dataset


def test_no_val_or_test_transcript_is_in_train(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    texts = {s: {m["txt"].decode() for m in _samples(root, s).values()} for s in spoken.SPLITS}
    assert not texts["train"] & (texts["val"] | texts["test"])
    for split, split_texts in texts.items():
        assert {transcript_split(text) for text in split_texts} == {split}
    heldout = manifest["heldout"]
    assert heldout["drawn"]["val"]["digits"] + heldout["drawn"]["val"]["phrase"] == 4
    assert all(heldout["pool"][split]["phrase"] > 50 for split in spoken.SPLITS)


def test_transcripts_voices_and_speeds_vary(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    metas = [json.loads(s["json"]) for s in _samples(root, "train").values()]
    assert len({m["text"] for m in metas}) > 8
    assert {m["kind"] for m in metas} == {"digits", "phrase"}
    assert len({m["voice"] for m in metas}) > 4
    assert len({m["speed"] for m in metas}) > 4 and len({m["pitch"] for m in metas}) > 4


def test_every_voice_sounds_different() -> None:
    clips = {espeak("three one four", voice, 160, 50)[0].tobytes() for voice in VOICES}
    assert len(clips) == len(VOICES)


def test_ensure_does_not_rewrite(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    digests = _digests(root)
    assert ensure_spoken(root, seed=0, **SMALL) == manifest
    assert _digests(root) == digests


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["spoken", "--out", str(tmp_path), "--train", "3", "--val", "1", "--test", "1"]
    assert main([*argv, "--workers", "1"]) == 0
    assert "spoken: train=3 val=1 test=1" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["num_train"] == 3 and manifest["params"]["sample_rate"] == 16_000
    assert main([*argv, "--sample-rate", "8000", "--force"]) == 0
    audio = next(iter(_samples(tmp_path, "test").values()))["flac"]
    assert soundfile.info(io.BytesIO(audio)).samplerate == 8000


def test_missing_espeak_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("espeak-ng") is None
    with pytest.raises(ConfigError, match=r"apt-get install espeak-ng"):
        write_spoken(tmp_path / "out", **SMALL)
    assert main(["spoken", "--out", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: spoken: espeak-ng") and err.count("\n") == 1
    assert "apt-get install espeak-ng" in err
    assert not (tmp_path / "cli" / "manifest.json").exists()
