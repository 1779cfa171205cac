"""`polymodal.load` on audio checkpoints: what clips `preprocess_audio` takes (files, bytes,
waveform arrays and tensors at any rate), its errors, and inference without gradients."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile
import torch

import polymodal
from polymodal.data.audio import resample
from tests.apps.test_audio_recipes import asr, clap, val_clips  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def clap_model(clap):  # noqa: F811 (the imported fixture)
    return polymodal.load(clap)


@pytest.fixture(scope="module")
def asr_model(asr):  # noqa: F811 (the imported fixture)
    return polymodal.load(asr)


@pytest.fixture(scope="module")
def sounds(sounds_dir) -> list[tuple[str, bytes, np.ndarray]]:
    """(key, flac bytes, mono float32 waveform at 16 kHz) of 4 val clips."""
    clips = val_clips(sounds_dir)
    return [(k, d, soundfile.read(io.BytesIO(d), dtype="float32")[0]) for k, d, _ in clips]


def test_a_waveform_batch_tensor_equals_arrays_and_files(clap_model, sounds, tmp_path):
    paths = []
    for key, data, _ in sounds:
        paths.append(tmp_path / f"{key}.flac")
        paths[-1].write_bytes(data)
    arrays = [wave for _, _, wave in sounds]
    from_files = clap_model.encode_audio(paths)
    torch.testing.assert_close(clap_model.encode_audio(arrays), from_files, atol=1e-5, rtol=0)
    batch = torch.from_numpy(np.stack(arrays))
    torch.testing.assert_close(clap_model.encode_audio(batch), from_files, atol=1e-5, rtol=0)
    rows = [torch.from_numpy(wave) for wave in arrays]  # a list of 1-D tensors
    torch.testing.assert_close(clap_model.encode_audio(rows), from_files, atol=1e-5, rtol=0)
    spectrograms = clap_model.preprocess_audio(batch)
    assert spectrograms.shape[:2] == (4, 1)
    torch.testing.assert_close(clap_model.encode_audio(spectrograms), from_files)


def test_stereo_at_another_rate_is_mixed_down_and_resampled(clap_model, sounds):
    mono = sounds[0][2]
    high = resample(mono, 16000, 44100)
    stereo = np.stack([high * 0.9, high * 1.1], axis=1)  # [samples, channels]
    expected = clap_model.encode_audio([mono])
    got = clap_model.encode_audio([stereo], sample_rate=44100)
    assert torch.cosine_similarity(got, expected).item() > 0.99
    batch = torch.from_numpy(high)[None]  # a [1, samples] tensor at 44.1 kHz
    got = clap_model.encode_audio(batch, sample_rate=44100)
    assert torch.cosine_similarity(got, expected).item() > 0.99


def test_bad_clips_raise_one_clear_value_error(clap_model, sounds, tmp_path):
    with pytest.raises(ValueError, match="no audio clips given"):
        clap_model.encode_audio([])
    with pytest.raises(ValueError, match="clip 1: empty waveform"):
        clap_model.encode_audio([sounds[0][2], np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="clip 0: empty waveform"):
        clap_model.encode_audio(torch.zeros(2, 0))
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC not really a flac file")
    with pytest.raises(ValueError, match=f"cannot read audio file {corrupt}: corrupt audio"):
        clap_model.encode_audio([sounds[0][1], corrupt])
    with pytest.raises(ValueError, match=r"clip 1 \(bytes\): corrupt audio"):
        clap_model.encode_audio([sounds[0][1], b"junk"])
    with pytest.raises(ValueError, match="expected float samples, got int16"):
        clap_model.encode_audio([(sounds[0][2] * 32767).astype(np.int16)])
    with pytest.raises(ValueError, match=r"must be 1-D \(mono\), got shape \(2, 32000\)"):
        clap_model.encode_audio([torch.zeros(2, 32000)])  # torchaudio's [channels, samples]
    with pytest.raises(ValueError, match="expected a list of clips, got one str"):
        clap_model.encode_audio(str(corrupt))


def test_a_cut_waveform_is_warned_about_once_per_call(clap_model, sounds, caplog):
    long = np.concatenate([sounds[0][2], sounds[1][2]])  # 4 s; the checkpoint hears 2 s
    with caplog.at_level(logging.WARNING, logger="polymodal.api"):
        cut = clap_model.encode_audio([long, long, sounds[2][2]])
    warnings = [r.getMessage() for r in caplog.records if r.name == "polymodal.api"]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 audio clips are longer")
    assert "data.audio.seconds (2 s" in warnings[0]
    torch.testing.assert_close(cut[0], clap_model.encode_audio([sounds[0][2]])[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polymodal.api"):
        clap_model.encode_audio([sounds[0][1]])  # files: only the window is decoded
    assert not caplog.records


def test_zero_shot_keeps_its_images_keyword(clap_model, sounds):
    probs = clap_model.zero_shot(
        images=[wave for _, _, wave in sounds], class_names=["beep", "buzz"], templates=["a {}"]
    )
    assert probs.shape == (4, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_generate_and_transcribe_run_without_gradients(asr_model, spoken_dir, monkeypatch):
    model = asr_model
    clips = [data for _, data, _ in val_clips(spoken_dir, count=2)]
    expected = model.transcribe(clips, max_length=6)
    encoder = model.module.model.encode
    memories = []

    def encode(modality, inputs, *args, **kwargs):
        memories.append(encoder(modality, inputs, *args, **kwargs))
        return memories[-1]

    monkeypatch.setattr(model.module.model, "encode", encode)
    assert torch.is_grad_enabled()
    assert model.generate(audio=clips, max_length=6) == expected
    assert model.transcribe(clips, max_length=6) == expected
    assert len(memories) == 2 and not any(m.requires_grad for m in memories)
    assert all(m.grad_fn is None for m in memories)
    waves = [soundfile.read(io.BytesIO(d), dtype="float32")[0] for d in clips]
    high = [resample(w, 16000, 48000) for w in waves]
    assert len(model.transcribe(high, sample_rate=48000, max_length=6)) == 2
