"""The audio pipeline: decoding (formats, mono, resampling, hostile headers), crop/pad
modes, the log-mel spectrogram against librosa, SpecAugment, and bad audio members
skipped and counted by the shard reader."""

from __future__ import annotations

import io

import librosa
import numpy as np
import pytest
import soundfile
import torch

from polymodal.data.audio import AudioClips, LogMel, fit_length, read_audio, spec_augment
from polymodal.data.shards import SampleDecoder, SkipPolicy, decoded_samples
from polymodal.utils.errors import SkippedSample
from tests.helpers import write_tar


def encode(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    subtype = {"MP3": "MPEG_LAYER_III", "OGG": "VORBIS"}.get(fmt, "PCM_16")
    soundfile.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(freq: float, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    wave = 0.4 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_every_format_decodes_to_mono_at_the_asked_rate(fmt):
    stereo = tone(440.0, 44100, 1.0, channels=2)
    stereo[:, 1] *= 0.5  # the mixdown is the mean of the channels
    wave = read_audio(encode(stereo, 44100, fmt), 16000, max_seconds=10)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 16000) <= 1200  # mp3/ogg encoders pad a few frames
    assert abs(peak_hz(wave, 16000) - 440.0) < 2.0  # resampled, not re-pitched
    if fmt in ("WAV", "FLAC"):  # lossless: the mean of 0.4 and 0.2 amplitude
        assert np.abs(wave[2000:14000]).max() == pytest.approx(0.3, abs=0.01)


def test_a_clip_declaring_more_than_max_seconds_is_refused_before_decoding():
    data = encode(tone(440.0, 8000, 3.0), 8000, "FLAC")
    with pytest.raises(SkippedSample) as err:
        read_audio(data, 16000, max_seconds=2.0)
    assert err.value.reason == "audio_too_long" and "max_seconds 2.0" in err.value.detail


def test_garbage_is_undecodable():
    with pytest.raises(SkippedSample) as err:
        read_audio(b"RIFF....WAVEnot really", 16000, max_seconds=10)
    assert err.value.reason == "undecodable"


def test_crop_and_pad_modes():
    clip = torch.arange(1, 4, dtype=torch.float32)  # [1, 2, 3]
    assert fit_length(clip, 8, "start", "repeatpad").tolist() == [1, 2, 3, 1, 2, 3, 0, 0]
    assert fit_length(clip, 8, "start", "repeat").tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert fit_length(clip, 5, "start", "pad").tolist() == [1, 2, 3, 0, 0]
    long = torch.arange(100, dtype=torch.float32)
    assert fit_length(long, 10, "start", "pad").tolist() == list(range(10))
    torch.manual_seed(0)
    first = fit_length(long, 10, "random", "pad")
    starts = {int(fit_length(long, 10, "random", "pad")[0]) for _ in range(50)}
    torch.manual_seed(0)
    assert torch.equal(fit_length(long, 10, "random", "pad"), first)  # seeded
    assert first.tolist() == list(range(int(first[0]), int(first[0]) + 10))  # contiguous
    assert len(starts) > 20 and min(starts) >= 0 and max(starts) <= 90
    with pytest.raises(ValueError, match="data.audio.pad"):
        fit_length(clip, 8, "start", "loop")


def test_log_mel_equals_librosa():
    rng = np.random.default_rng(0)
    rate, hop = 16000, 320
    wave = (tone(300.0, rate, 1.0)[:, 0] + 0.05 * rng.standard_normal(rate)).astype(np.float32)
    ours = LogMel(rate, n_fft=400, hop_length=hop, n_mels=64)(torch.from_numpy(wave)[None])
    power = librosa.feature.melspectrogram(
        y=wave, sr=rate, n_fft=400, hop_length=hop, n_mels=64, center=True, pad_mode="reflect"
    )[:, : rate // hop]
    log = np.log10(np.maximum(power, 1e-10))
    expected = (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0
    assert ours.shape == (1, 1, 64, rate // hop)
    np.testing.assert_allclose(ours[0, 0].numpy(), expected, atol=2e-3)


def test_spec_augment_zeroes_bands_and_is_seeded():
    spec = torch.ones(4, 1, 64, 100)
    torch.manual_seed(1)
    masked = spec_augment(spec, freq_masks=1, freq_width=8, time_masks=1, time_width=10)
    torch.manual_seed(1)
    assert torch.equal(masked, spec_augment(spec, 1, 8, 1, 10))
    for clip in masked[:, 0]:
        zero_rows = int((clip == 0).all(dim=1).sum())
        zero_cols = int((clip == 0).all(dim=0).sum())
        assert zero_rows <= 8 and zero_cols <= 10
    assert (masked == 0).any()
    assert torch.equal(spec, torch.ones(4, 1, 64, 100))  # the input is left alone


def test_eval_clips_are_deterministic_and_training_clips_are_augmented():
    data = encode(tone(440.0, 16000, 3.0), 16000, "FLAC")
    augment = {"freq_masks": 1, "freq_width": 4, "time_masks": 1, "time_width": 4}
    train = AudioClips(True, seconds=1.0, spec_augment=augment)
    val = AudioClips(False, seconds=1.0, spec_augment=augment)
    assert val.crop == "start" and not val.augment and train.augment == augment
    assert torch.equal(val.read(data), val.read(data))
    spec = val.features(torch.stack([val.read(data)]))
    assert spec.shape == (1, 1, 64, 50)


def test_bad_audio_members_are_skipped_and_counted(tmp_path):
    good = encode(tone(440.0, 16000, 0.5), 16000, "FLAC")
    long = encode(tone(440.0, 16000, 4.0), 16000, "WAV")
    shard = write_tar(
        tmp_path / "a.tar",
        [
            ("good.flac", good),
            ("good.txt", b"a beep"),
            ("broken.flac", b"fLaC but not really"),
            ("broken.txt", b"a broken clip"),
            ("long.wav", long),
            ("long.txt", b"a long clip"),
            ("silent.txt", b"no clip at all"),
            ("image.png", b"\x89PNG"),
            ("image.txt", b"an image, not a sound"),
        ],
    )
    decoder = SampleDecoder(
        modalities=("audio", "text"), audio=AudioClips(False, seconds=1.0, max_seconds=2.0)
    )
    skips = SkipPolicy(quiet=True)
    samples = list(decoded_samples([str(shard)], decoder, skips))
    assert [s["key"] for s in samples] == ["good"]
    assert samples[0]["text"] == "a beep" and samples[0]["audio"].shape == (16000,)
    assert "image" not in samples[0]
    assert skips.counts == {"undecodable": 1, "audio_too_long": 1, "no_audio": 2}


def test_spectrogram_pictures_put_low_frequencies_at_the_bottom():
    from polymodal.evaluation.media import to_uint8

    spec = torch.zeros(1, 1, 64, 100)
    spec[0, 0, :8] = 1.0  # energy in the lowest mel bins
    pixels = to_uint8(spec)
    assert pixels.shape == (1, 64, 100, 3) and pixels.dtype == np.uint8
    assert pixels[0, -8:].mean() > pixels[0, :-8].mean() + 100  # bright bottom rows


def wav_with_header(rate: int, channels: int = 1, frames: int = 64) -> bytes:
    """A small PCM WAV whose header declares `rate` and `channels` (as a hostile file may)."""
    import struct

    data = b"\x00\x00" * frames * channels
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(data),
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        rate,
        rate * channels * 2,
        channels * 2,
        16,
        b"data",
        len(data),
    )
    return header + data


@pytest.mark.parametrize(
    "rate, channels", [(2_147_483_647, 1), (499_999, 1), (100, 1), (16000, 64)]
)
def test_declared_rates_and_channels_out_of_range_are_refused_unread(rate, channels):
    with pytest.raises(SkippedSample) as err:
        read_audio(wav_with_header(rate, channels), 16000, max_seconds=600)
    assert err.value.reason == "undecodable" and f"{rate} Hz x {channels} channels" in str(
        err.value
    )


def test_an_odd_rate_resamples_by_fft_and_a_window_is_all_that_is_decoded():
    wave = read_audio(encode(tone(440.0, 44_101, 1.0), 44_101, "WAV"), 16000, 10)
    assert abs(len(wave) - 16000) <= 1 and abs(peak_hz(wave, 16000) - 440.0) < 2.0
    long = encode(tone(440.0, 16000, 30.0), 16000, "FLAC")
    window = read_audio(long, 16000, max_seconds=60, seconds=1.5, crop="random")
    assert window.shape == (24000,)


def test_non_finite_samples_refuse_the_clip():
    wave = tone(440.0, 16000, 0.5)
    wave[100] = np.nan
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(SkippedSample, match="not finite"):
        read_audio(buffer.getvalue(), 16000, max_seconds=10)
