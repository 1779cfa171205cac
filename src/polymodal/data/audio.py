"""Audio members of a shard -> model input, in the loader workers.

A clip is decoded by libsndfile (soundfile: flac, wav, ogg, mp3), mixed down to mono,
resampled to `sample_rate` (scipy's polyphase filter) and cropped or padded to a fixed
number of samples (`fit_length`, CLAP's truncation and padding modes). A batch of clips
becomes a log-mel spectrogram (nnAudio's STFT and librosa-equivalent mel filters, so
torchaudio, which pins an older torch, is not needed) normalised as Whisper does, with
SpecAugment masking for training.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import Tensor, nn

from polymodal.utils.errors import SkippedSample

# the members holding a sample's audio clip: the first one present is used
AUDIO_KEYS = ("flac", "wav", "mp3", "ogg")
PAD_MODES = ("repeatpad", "repeat", "pad")
CROP_MODES = ("random", "start")
DEFAULT_MAX_AUDIO_SECONDS = 600.0  # a declared length over this is refused before decoding
# what a clip's header may declare: anything else is refused before a sample is decoded
RATE_RANGE = (1_000, 384_000)
MAX_CHANNELS = 8
# rate ratios up to this (after dividing by their gcd: 44.1 kHz -> 16 kHz is 160/441) use
# the polyphase filter; odder ratios the FFT, whose cost does not grow with the ratio
MAX_POLYPHASE_FACTOR = 1000


def read_audio(
    data: bytes,
    sample_rate: int,
    max_seconds: float,
    seconds: float | None = None,
    crop: str = "start",
) -> np.ndarray:
    """Mono float32 samples at `sample_rate` of an encoded clip: with `seconds`, only a
    window of that length is decoded (`crop="random"`: at a random offset drawn from
    torch's generator; `"start"`: the first), so a long clip costs what a short one does.

    A clip is input from elsewhere: its header's rate, channels and length are checked
    before anything is decoded (a 2 KB file may declare 2 GHz or hours of 8 channels),
    and samples that are not finite (a float WAV may hold NaN) refuse the clip, since one
    would turn a whole batch's loss into NaN. Bad clips raise SkippedSample.
    """
    import soundfile  # libsndfile: loaded by processes that read audio only

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as clip:
            rate, frames, channels = clip.samplerate, clip.frames, clip.channels
            check_header(rate, frames, channels, max_seconds)
            count = frames
            if seconds is not None:
                count = min(frames, math.ceil(seconds * rate))
                if frames > count and crop == "random":
                    clip.seek(int(torch.randint(frames - count + 1, ())))
            wave = clip.read(count, dtype="float32", always_2d=True)
    except SkippedSample:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile's errors are all "bad clip"
        raise SkippedSample("undecodable", f"corrupt audio ({type(exc).__name__})") from exc
    if wave.shape[0] == 0:
        raise SkippedSample("empty_audio", "audio clip with no samples")
    if not np.isfinite(wave).all():
        raise SkippedSample("undecodable", "audio samples that are not finite (NaN, inf)")
    return resample(wave.mean(axis=1), rate, sample_rate)


def check_header(rate: int, frames: int, channels: int, max_seconds: float) -> None:
    """Refuse (SkippedSample) a clip whose header declares a rate, channel count or length
    no reader should allocate for, before anything is decoded."""
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1] or not 1 <= channels <= MAX_CHANNELS:
        raise SkippedSample(
            "undecodable",
            f"{rate} Hz x {channels} channels (readable: {RATE_RANGE[0]}-"
            f"{RATE_RANGE[1]} Hz, 1-{MAX_CHANNELS} channels)",
        )
    if frames / rate > max_seconds:
        raise SkippedSample(
            "audio_too_long",
            f"{frames} samples at {rate} Hz > data.audio.max_seconds {max_seconds}",
        )


def resample(wave: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """Mono `wave` at `rate` -> float32 at `sample_rate` (scipy: polyphase filter for
    common rate pairs, FFT for odd ones)."""
    if rate == sample_rate:
        return wave.astype(np.float32, copy=False)
    from scipy.signal import resample as fft_resample
    from scipy.signal import resample_poly

    common = math.gcd(rate, sample_rate)
    up, down = sample_rate // common, rate // common
    if max(up, down) <= MAX_POLYPHASE_FACTOR:
        return resample_poly(wave, up, down).astype(np.float32)
    return fft_resample(wave, max(1, round(len(wave) * sample_rate / rate))).astype(np.float32)


def fit_length(wave: Tensor, length: int, crop: str, pad: str) -> Tensor:
    """`wave` [N] cropped or padded to `length` samples.

    Longer clips: `crop="random"` takes a window at a random offset (torch's generator,
    which the training stream seeds per sample), `"start"` the first `length` samples
    (evaluation always does). Shorter ones: `"repeatpad"` repeats the clip as many whole
    times as fit, then pads with zeros (CLAP's default), `"repeat"` tiles it to the length,
    `"pad"` pads with zeros.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"data.audio.crop must be one of {CROP_MODES}, got {crop!r}")
    if pad not in PAD_MODES:
        raise ValueError(f"data.audio.pad must be one of {PAD_MODES}, got {pad!r}")
    size = wave.shape[0]
    if size >= length:
        start = int(torch.randint(size - length + 1, ())) if crop == "random" else 0
        return wave[start : start + length]
    if pad == "repeat":
        return wave.repeat(-(-length // size))[:length]
    if pad == "repeatpad":
        wave = wave.repeat(length // size)
    return torch.nn.functional.pad(wave, (0, length - wave.shape[0]))


class LogMel(nn.Module):
    """Waveforms [B, N] -> log-mel spectrograms [B, 1, n_mels, N // hop_length].

    Power mel spectrogram (Hann window, centred frames, Slaney mel scale and norm as
    librosa's defaults), log10, floored at 8 decades below each clip's peak and scaled by
    (x + 4) / 4: Whisper's normalisation, which puts speech and silence in about [-1, 1]
    without dataset statistics. The last centred frame is dropped so a clip of
    `seconds * sample_rate` samples gives exactly that many hops.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 320,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        from nnAudio.features import MelSpectrogram  # loaded by processes that read audio only

        self.hop_length = hop_length
        self.mel = MelSpectrogram(
            sr=sample_rate,
            n_fft=n_fft,
            n_mels=n_mels,
            hop_length=hop_length,
            fmin=f_min,
            fmax=f_max,
            center=True,
            power=2.0,
            verbose=False,
        )

    @torch.no_grad()
    def forward(self, waves: Tensor) -> Tensor:
        frames = waves.shape[-1] // self.hop_length
        log = self.mel(waves)[..., :frames].clamp(min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return ((log + 4.0) / 4.0).unsqueeze(1)


def spec_augment(
    spec: Tensor, freq_masks: int, freq_width: int, time_masks: int, time_width: int
) -> Tensor:
    """SpecAugment (Park et al. 2019) without time warping: per clip, `freq_masks` bands of
    up to `freq_width` mel bins and `time_masks` spans of up to `time_width` frames set to
    zero (about the normalised spectrogram's mean). Draws from torch's generator."""
    spec = spec.clone()
    batch, _, bins, frames = spec.shape
    for count, width, size, axis in (
        (freq_masks, freq_width, bins, 2),
        (time_masks, time_width, frames, 3),
    ):
        for _ in range(count):
            widths = torch.randint(0, min(width, size) + 1, (batch,))
            starts = (torch.rand(batch) * (size - widths + 1)).long()
            positions = torch.arange(size)
            band = (positions >= starts[:, None]) & (positions < (starts + widths)[:, None])
            shape = (batch, 1, size, 1) if axis == 2 else (batch, 1, 1, size)
            spec = spec.masked_fill(band.view(shape), 0.0)
    return spec


class AudioClips:
    """What the data pipeline does to audio: `read(bytes) -> wave` per sample (decode,
    mono, resample, crop/pad) and `features(waves) -> spectrograms` per batch (log-mel,
    SpecAugment when training). A plain picklable object, so spawned workers get it."""

    def __init__(
        self,
        train: bool,
        sample_rate: int = 16000,
        seconds: float = 2.0,
        crop: str = "random",
        pad: str = "repeatpad",
        n_fft: int = 400,
        hop_length: int = 320,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        spec_augment: dict | None = None,
        max_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
        keys: tuple[str, ...] = AUDIO_KEYS,
    ) -> None:
        self.train, self.sample_rate, self.max_seconds = train, sample_rate, max_seconds
        self.length = int(round(seconds * sample_rate))
        self.crop = crop if train else "start"
        self.pad = pad
        fit_length(torch.zeros(1), 1, self.crop, pad)  # check the modes now, in one line
        self.keys = tuple(keys)
        augment = dict(spec_augment or {})
        expected = {"freq_masks", "freq_width", "time_masks", "time_width"}
        if augment and set(augment) != expected:
            raise ValueError(
                f"spec_augment needs exactly {sorted(expected)}, got {sorted(augment)}"
            )
        self.augment = augment if train else {}
        self.log_mel = LogMel(sample_rate, n_fft, hop_length, n_mels, f_min, f_max)

    def read(self, data: bytes) -> Tensor:
        """An encoded clip -> its mono waveform [length] (only that window is decoded)."""
        seconds = self.length / self.sample_rate
        wave = read_audio(data, self.sample_rate, self.max_seconds, seconds, self.crop)
        return self.fit(torch.from_numpy(wave))

    def fit(self, wave: Tensor) -> Tensor:
        """A mono waveform at `sample_rate` cropped or padded to [length]."""
        return fit_length(wave, self.length, self.crop, self.pad)

    def features(self, waves: Tensor) -> Tensor:
        spec = self.log_mel(waves)
        if self.augment:
            spec = spec_augment(spec, **self.augment)
        return spec


def spectrogram_pixels(spectrograms: Tensor, colormap: str = "magma") -> np.ndarray:
    """Pictures of log-mel spectrograms [N, 1, mels, frames] -> RGB uint8 [N, mels,
    frames, 3]: low frequencies at the bottom, each clip scaled to its own range (what
    contact sheets and retrieval pictures show)."""
    from matplotlib import colormaps

    spectrograms = spectrograms.detach().float().cpu()[:, 0].flip(1)  # row 0 = highest mel
    low = spectrograms.amin(dim=(1, 2), keepdim=True)
    high = spectrograms.amax(dim=(1, 2), keepdim=True)
    scaled = ((spectrograms - low) / (high - low).clamp(min=1e-6)).numpy()
    return (colormaps[colormap](scaled)[..., :3] * 255).round().astype(np.uint8)
