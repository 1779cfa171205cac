"""`polymodal-data verify | inspect` on audio-caption shards, as a user types them (no flag):
the modalities come from the shards, bad clips are reported as training skips them, and
inspect's contact sheet shows spectrograms."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from polymodal.data.check import decoder_for
from polymodal.data.cli import main
from polymodal.data.shards import SkipPolicy, decoded_samples
from polymodal.data.sounds import write_sounds
from tests.helpers import samples_by_key, tar_members, write_tar


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sounds")
    write_sounds(root, num_train=40, num_val=10, num_test=10, shard_size=20)
    return root


def flac(wave: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def a_good_sample(sounds: Path) -> dict[str, bytes]:
    """{flac, txt, json} of the first val sample."""
    shard = next((sounds / "val").glob("*.tar"))
    return next(iter(samples_by_key(tar_members(shard)).values()))


def test_verify_reads_every_sample_of_a_sounds_dataset(sounds, capsys):
    assert main(["verify", str(sounds / "train" / "*.tar")]) == 0
    out = capsys.readouterr().out
    assert out == "verify: 40 good samples, 0 bad, in 2 shards (read as audio,text)\n"


def test_verify_reports_bad_clips_as_training_skips_them(sounds, tmp_path, capsys):
    """A corrupt .flac, a clip whose header declares 601 s (silence at 1 kHz: a small file) and a
    sample without audio: one line each, exit code 1, and training skips the same three
    with the reasons undecodable, audio_too_long and no_audio."""
    good = a_good_sample(sounds)
    shard = write_tar(
        tmp_path / "bad-000000.tar",
        [
            ("silent.txt", b"a caption without its clip"),  # first: detection looks further
            ("corrupt.flac", good["flac"][:200]),
            ("corrupt.txt", b"a cut-off clip"),
            ("long.flac", flac(np.zeros(601 * 1000, dtype=np.float32), 1000)),
            ("long.txt", b"ten minutes of nothing"),
            ("good.flac", good["flac"]),
            ("good.txt", good["txt"]),
        ],
    )
    assert main(["verify", str(shard)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{shard}:silent: no audio member (flac, wav, mp3, ogg)"
    assert lines[1].startswith(f"{shard}:corrupt: .flac: corrupt audio (")
    expected = f"{shard}:long: .flac: 601000 samples at 1000 Hz > data.audio.max_seconds 600.0"
    assert lines[2] == expected
    assert lines[3:] == ["verify: 1 good samples, 3 bad, in 1 shards (read as audio,text)"]

    skip = SkipPolicy(quiet=True)
    kept = list(decoded_samples([str(shard)], decoder_for(("audio", "text")), skip))
    assert [s["key"] for s in kept] == ["good"]
    assert skip.counts == {"undecodable": 1, "audio_too_long": 1, "no_audio": 1}


def test_inspect_draws_a_spectrogram_per_clip(sounds, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    args = ["inspect", str(sounds / "val" / "*.tar"), "--show", "2", "--sheet", str(sheet)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "10 samples in 1 shards (read as audio,text)" in out
    assert "members: .flac x10, .json x10, .txt x10" in out
    assert out.count('"audio_seconds": 2.0, "sample_rate": 16000') == 2
    assert f"contact sheet of 10 spectrograms: {sheet}" in out

    colours = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
    pixels = np.asarray(Image.open(sheet).convert("L"))
    thumb, row = 128, 128 + 36
    assert pixels.shape == (3 * row, 4 * thumb)  # 10 tiles, 4 a row
    for i in range(10):
        y, x = (i // 4) * row, (i % 4) * thumb
        tile = pixels[y : y + thumb, x : x + thumb]
        assert tile.min() < 64 and tile.std() > 10, f"tile {i} is blank"
        red, blue = colours[y : y + thumb, x : x + thumb, [0, 2]].transpose(2, 0, 1)
        assert (red - blue).std() > 10, f"tile {i} is not in the colour map"
        assert (pixels[y + thumb : y + row, x : x + thumb] < 128).any(), f"caption {i}"
    assert (pixels[2 * row :, 2 * thumb :] == 255).all()  # no tiles 11 and 12


def test_modalities_override_what_the_shards_suggest(sounds, tmp_path, capsys):
    """Sounds read as image shards lack every image; a sample with an image and a corrupt
    clip is read as an image sample unless told otherwise."""
    assert main(["verify", str(sounds / "val" / "*.tar"), "--modalities", "image,text"]) == 1
    out = capsys.readouterr().out
    assert out.count("no image member (png, jpg, jpeg, webp)") == 10
    assert out.endswith("verify: 0 good samples, 10 bad, in 1 shards (read as image,text)\n")

    both = write_tar(
        tmp_path / "both.tar",
        [("a.png", png()), ("a.flac", b"not a clip"), ("a.txt", b"a red square")],
    )
    assert main(["verify", str(both)]) == 0
    assert "1 good samples, 0 bad, in 1 shards (read as image,text)" in capsys.readouterr().out
    assert main(["inspect", str(both)]) == 0
    assert '"image_size": [8, 8]}' in capsys.readouterr().out  # the clip left unread
    assert main(["inspect", str(both), "--modalities", "audio,text"]) == 0
    out = capsys.readouterr().out
    assert "0 samples in 1 shards (read as audio,text)" in out
    assert "bad samples: 1 (.flac: corrupt audio (" in out
