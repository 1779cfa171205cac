"""The audio experiments end to end through the train app on small generated data:
CLAP in every sharing mode, Whisper-style transcription (WER) and audio captioning."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import polymodal
from polymodal.embed import embed
from polymodal.evaluate import captioning, probe, zeroshot_retrieval
from polymodal.utils.cli import CONFIG_DIR
from polymodal.utils.errors import ConfigError
from tests.helpers import tar_members, train_tiny


# multiway and shared: audio through the one trunk at the model level
# (tests/models/test_audio_stem.py), every objective through it in a training run
# (tests/apps/test_train.py); a run of clap_sounds in each took a minute of CI
def test_clap_sounds_trains_and_scores_every_attribute(sounds_dir, shapes_dir, tmp_path):
    ckpt, _ = train_tiny(
        tmp_path, shapes_dir, "experiment=clap_sounds", f"paths.sounds_dir={sounds_dir}"
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    attributes = json.loads((sounds_dir / "manifest.json").read_text())["attributes"]
    for attribute in attributes:  # every attribute scored zero-shot from audio
        assert f"val/zeroshot/{attribute}_acc" in metrics
    assert "val/retrieval/i2t_r5" in metrics  # audio -> text
    # media: spectrograms of the first val clips beside their retrieved captions
    assert list((tmp_path / "media").glob("retrieval_step2.png"))
    rows = (tmp_path / "media" / "retrieval_step2.csv").read_text().splitlines()
    assert rows[0].startswith("sample,caption,retrieved_1") and len(rows) == 9
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("image" in name for name in state)
    assert any(n.startswith("model.encoders.audio.") for n in state), "no audio tower"


def test_asr_spoken_reports_word_error_rate(spoken_dir, shapes_dir, tmp_path):
    train_tiny(tmp_path, shapes_dir, "experiment=asr_spoken", f"paths.spoken_dir={spoken_dir}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val/caption/wer"] > 0.0  # an untrained decoder gets words wrong
    assert "val/retrieval/mean_r1" not in metrics
    rows = (tmp_path / "samples").glob("captions_step*.jsonl")
    first = json.loads(next(rows).read_text().splitlines()[0])
    assert set(first) == {"generated", "reference"} and first["reference"]


def test_audio_captioner_scores_captions_of_clips(sounds_dir, shapes_dir, tmp_path):
    train_tiny(tmp_path, shapes_dir, "experiment=audio_captioner", f"paths.sounds_dir={sounds_dir}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("bleu4", "cider", "attribute_match"):
        assert f"val/caption/{key}" in metrics


@pytest.fixture(scope="module")
def clap(tmp_path_factory, sounds_dir, shapes_dir):
    """last.ckpt of a short clap_sounds run."""
    run = tmp_path_factory.mktemp("clap")
    return train_tiny(run, shapes_dir, "experiment=clap_sounds", f"paths.sounds_dir={sounds_dir}")[
        0
    ]


@pytest.fixture(scope="module")
def asr(tmp_path_factory, spoken_dir, shapes_dir):
    """last.ckpt of a short asr_spoken run."""
    run = tmp_path_factory.mktemp("asr")
    return train_tiny(run, shapes_dir, "experiment=asr_spoken", f"paths.spoken_dir={spoken_dir}")[0]


def val_clips(dataset_dir, count: int = 4) -> list[tuple[str, bytes, str]]:
    """(key, flac bytes, caption) of the first val samples."""
    members = tar_members(sorted((dataset_dir / "val").glob("*.tar"))[0])
    keys = [name[: -len(".flac")] for name in members if name.endswith(".flac")][:count]
    return [(k, members[f"{k}.flac"], members[f"{k}.txt"].decode()) for k in keys]


def test_load_encodes_clips_from_files_bytes_and_waveforms(clap, sounds_dir, tmp_path):
    model = polymodal.load(clap)
    assert model.modality == "audio"
    clips = val_clips(sounds_dir)
    paths = []
    for key, data, _ in clips:
        paths.append(tmp_path / f"{key}.flac")
        paths[-1].write_bytes(data)
    waves = [soundfile.read(io.BytesIO(data), dtype="float32")[0] for _, data, _ in clips]
    from_files = model.encode_audio(paths)
    assert from_files.shape == (4, 128)
    assert torch.allclose(from_files.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(model.encode_audio([d for _, d, _ in clips]), from_files)
    assert torch.allclose(model.encode_audio(waves), from_files, atol=1e-5)
    # the same clips through the training pipeline's val batches give the same embeddings
    samples = list(model.read_shards(str(sounds_dir / "val" / "*.tar"), []))[:4]
    assert torch.allclose(model.module.model.embed("audio", model.batch_input(samples)), from_files)
    probs = model.zero_shot(paths, ["beep", "buzz", "hiss"], ["a {}"])
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(-1), torch.ones(4))
    with pytest.raises(ConfigError, match="has no image"):
        model.encode_image(torch.zeros(1, 3, 64, 64))


def test_embed_and_eval_apps_score_audio(clap, sounds_dir, tmp_path):
    out = tmp_path / "emb"
    cfg = OmegaConf.create(
        {
            "ckpt_path": str(clap),
            "shards": str(sounds_dir / "val" / "*.tar"),
            "out_dir": str(out),
            "batch_size": 16,
            "device": "cpu",
        }
    )
    summary = embed(cfg)
    assert summary["samples"] == 64 and summary["skipped"] == 0
    audio = np.load(out / "audio_embeddings.npy")
    keys = [json.loads(line) for line in (out / "keys.txt").read_text().splitlines()]
    model = polymodal.load(clap)
    first = [k for k, _, _ in val_clips(sounds_dir)]
    assert keys[:4] == first
    expected = model.encode_audio([data for _, data, _ in val_clips(sounds_dir)])
    np.testing.assert_allclose(audio[:4], expected.numpy(), atol=1e-5)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        eval_cfg = compose("eval", overrides=["eval=sounds", f"paths.sounds_dir={sounds_dir}"])
    spec = OmegaConf.to_container(eval_cfg.eval.benchmarks, resolve=True)
    metrics = zeroshot_retrieval(model, spec["val"], 32, tmp_path, "val")
    for attribute in ("sound", "pitch", "count"):
        assert f"zeroshot/{attribute}_acc" in metrics
    assert metrics["samples"] == 64.0 and "retrieval/i2t_r5" in metrics
    picture = np.asarray(Image.open(tmp_path / "media" / "retrieval_val.png"))
    assert picture.shape[0] > 400 and picture.std() > 10  # 8 spectrogram rows
    assert set(probe(model, spec["linear_probe"], 32, tmp_path, "probe")) == {
        f"{a}_acc" for a in spec["linear_probe"]["labels"]
    }


def test_transcribe_and_the_speech_benchmark(asr, spoken_dir, tmp_path):
    model = polymodal.load(asr)
    clips = val_clips(spoken_dir, count=3)
    texts = model.transcribe([data for _, data, _ in clips], max_length=8)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert model.generate(audio=[d for _, d, _ in clips], max_length=8) == texts
    with pytest.raises(ConfigError, match="attends to audio, not image"):
        model.generate(images=torch.zeros(1, 3, 64, 64))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        eval_cfg = compose("eval", overrides=["eval=spoken", f"paths.spoken_dir={spoken_dir}"])
    spec = OmegaConf.to_container(eval_cfg.eval.benchmarks, resolve=True)["greedy"]
    metrics = captioning(model, {**spec, "max_samples": 8}, 4, tmp_path, "greedy")
    assert metrics["images"] == 8.0 and metrics["wer"] > 0.0
    rows = [
        json.loads(x) for x in (tmp_path / "captions" / "greedy.jsonl").read_text().split("\n") if x
    ]
    references = {r["key"]: r["references"] for r in rows}
    transcripts = {k: t for k, _, t in val_clips(spoken_dir, count=16)}
    assert all(references[k] == [transcripts[k]] for k in references if k in transcripts)


def test_a_trimodal_checkpoint_serves_both_modalities(sounds_dir, shapes_dir, tmp_path):
    """experiment=trimodal, its joint tokenizer made from both sources' shards: the
    checkpoint embeds sounds with `modality=audio` (polymodal-embed; images by default),
    refuses a modality it lacks, and the cross-modal benchmark prints R@k beside chance."""
    ckpt, _ = train_tiny(
        tmp_path / "run",
        shapes_dir,
        "experiment=trimodal",
        f"paths.sounds_dir={sounds_dir}",
        "model.towers.audio.depth=1",
    )
    assert (tmp_path / "run" / "data" / "trimodal" / "tokenizer.json").exists()
    model = polymodal.load(ckpt)
    assert model.modality == "image"
    with pytest.raises(ConfigError, match="not one of this checkpoint's"):
        model.modality = "text"
    out = tmp_path / "emb"
    settings = {"shards": str(sounds_dir / "val" / "*.tar"), "out_dir": str(out)}
    embed(
        OmegaConf.create(
            {
                "ckpt_path": str(ckpt),
                **settings,
                "batch_size": 16,
                "device": "cpu",
                "modality": "audio",
            }
        )
    )
    images = model.embed_shards(str(shapes_dir / "val" / "*.tar"), keep_images=2)  # eval's
    assert images["images"].shape[:2] == (2, 3) and images["sounds"] is None
    model.modality = "audio"
    expected = model.encode_audio([data for _, data, _ in val_clips(sounds_dir)])
    np.testing.assert_allclose(np.load(out / "audio_embeddings.npy")[:4], expected, atol=1e-5)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cross_modal.py"
    args = [
        "--pairs",
        "32",
        "--images",
        str(shapes_dir / "val"),
        "--sounds",
        str(sounds_dir / "val"),
    ]
    done = subprocess.run(
        [sys.executable, str(script), str(ckpt), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        line.split() for line in done.stdout.splitlines() if line.startswith(("image", "sound"))
    ]
    assert len(rows) == 6
    for *_, k, recall, chance, factor in rows:
        assert float(chance) == pytest.approx(int(k) / 32, abs=1e-3)
        assert float(factor) == pytest.approx(float(recall) / float(chance), abs=0.06)
