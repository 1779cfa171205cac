"""`polymodal-data build | verify | inspect`: formats, bad input, resume, reading back."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from polymodal.data.cli import main as data_cli
from polymodal.train import train
from tests.helpers import compose_train

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def write_image(path: Path, color: str, size: tuple[int, int] = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def good_rows(root: Path, count: int = 8) -> list[dict]:
    rows = []
    for i in range(count):
        color = COLORS[i % len(COLORS)]
        write_image(root / "imgs" / f"img{i}.png", color, (48 + i, 40))
        rows.append({"id": f"k{i}", "image": f"imgs/img{i}.png", "caption": f"a {color} square"})
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ","
            )
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def run_cli(*args: str) -> int:
    return data_cli([str(a) for a in args])


def build_table(table: Path, root: Path, out: Path, *options: str) -> int:
    """`polymodal-data build --input table --image-root root --out out [options]`."""
    return run_cli("build", "--input", table, "--image-root", root, "--out", out, *options)


def train_fast(shards: Path, run_dir: Path, batch_size: int = 4) -> dict:
    """A fast_dev_run of the default CLIP task on built shards (needs their tokenizer)."""
    overrides = [
        "debug=fdr",
        f"data.train_shards={shards}/*.tar",
        f"data.val_shards={shards}/*.tar",
        f"data.tokenizer={shards}/tokenizer.json",
        "data.zeroshot=null",
        f"data.batch_size={batch_size}",
        f"data.val_batch_size={batch_size}",
    ]
    metrics = train(compose_train(overrides, run_dir, run_dir))
    assert metrics["train/global_step"] == 1 and 0 <= metrics["val/retrieval/i2t_r1"] <= 1
    return metrics


def read_with_webdataset(pattern: str) -> list[dict]:
    """Samples as plain webdataset (no polymodal code) sees them."""
    return list(wds.WebDataset(pattern, shardshuffle=False))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_build_from_each_table_format(tmp_path, suffix):
    rows = good_rows(tmp_path)
    write_table(rows, tmp_path / f"captions{suffix}")
    out = tmp_path / "shards"
    options = ["--key-column", "id", "--shard-size", "3", "--image-size", "32"]
    code = build_table(
        tmp_path / f"captions{suffix}", tmp_path, out, *options, "--tokenizer-vocab", "300"
    )
    assert code == 0
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 3,
        "shard-000001.tar": 3,
        "shard-000002.tar": 2,
    }
    samples = read_with_webdataset(str(out / "shard-{000000..000002}.tar"))
    assert [s["__key__"] for s in samples] == [f"k{i}" for i in range(8)]
    for i, sample in enumerate(samples):
        assert sample["txt"].decode() == f"a {COLORS[i]} square"
        meta = json.loads(sample["json"])
        assert meta["original_width"] == 48 + i and meta["source_row"] == i
        assert Image.open(io.BytesIO(sample["jpg"])).size[1] == 32  # shorter side
    with tarfile.open(out / "shard-000000.tar") as tar:  # and plain tarfile
        assert tar.getnames()[:3] == ["k0.jpg", "k0.txt", "k0.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 8 and manifest["skipped"] == {}
    assert manifest["shards"]["shard-000000.tar"]["bytes"] > 0
    train_fast(out, tmp_path / "run")


def test_coco_build_keeps_every_caption_with_its_image_id(tmp_path):
    images, annotations = [], []
    for image_id, n_captions in [(11, 5), (12, 1), (13, 3)]:
        write_image(tmp_path / "coco" / f"{image_id}.png", "red")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "license": 3})
        annotations += [{"image_id": image_id, "caption": f"cap {i}"} for i in range(n_captions)]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    out = tmp_path / "shards"
    assert (
        run_cli(
            "build",
            "--coco",
            tmp_path / "ann.json",
            "--image-root",
            tmp_path / "coco",
            "--out",
            out,
            "--tokenizer-vocab",
            "300",
        )
        == 0
    )
    samples = read_with_webdataset(str(out / "shard-000000.tar"))
    assert len(samples) == 9
    by_image: dict[int, list[str]] = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        by_image.setdefault(meta["image_id"], []).append(sample["txt"].decode())
        assert meta["license"] == 3
    assert by_image == {
        11: [f"cap {i}" for i in range(5)],
        12: ["cap 0"],
        13: [f"cap {i}" for i in range(3)],
    }
    train_fast(out, tmp_path / "run")


def bad_input_table(root: Path) -> Path:
    """Three good rows and one row of each bad kind (CSV with raw non-UTF-8 bytes)."""
    rows = good_rows(root, 3)
    (root / "imgs" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_image(root / "imgs" / "huge.png", "red", (200, 200))
    rows += [
        {"id": "missing", "image": "imgs/nope.png", "caption": "a missing file"},
        {"id": "trunc", "image": "imgs/truncated.jpg", "caption": "a broken file"},
        {"id": "huge", "image": "imgs/huge.png", "caption": "too many pixels"},
        {"id": "empty", "image": "imgs/img0.png", "caption": "   "},
        {"id": "k0", "image": "imgs/img1.png", "caption": "duplicate key"},
        {"id": "../evil", "image": "imgs/img1.png", "caption": "unsafe key"},
        {"id": "latin1", "image": "imgs/img2.png", "caption": "BAD_BYTES"},
    ]
    path = root / "captions.csv"
    write_table(rows, path)
    path.write_bytes(path.read_bytes().replace(b"BAD_BYTES", b"caf\xe9 au lait"))
    return path


def test_each_bad_input_is_skipped_with_its_reason(tmp_path):
    table = bad_input_table(tmp_path)
    out = tmp_path / "shards"
    args = [
        "build",
        "--input",
        table,
        "--image-root",
        tmp_path,
        "--key-column",
        "id",
        "--max-pixels",
        "20000",
    ]
    assert run_cli(*args, "--out", out) == 0
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["key"]: s["reason"] for s in skipped} == {
        "missing": "missing_image",
        "trunc": "unreadable_image",
        "huge": "too_many_pixels",
        "empty": "empty_caption",
        "k0": "duplicate_key",
        "../evil": "unsafe_key",
        "latin1": "bad_caption_encoding",
    }
    assert [s["__key__"] for s in read_with_webdataset(str(out / "shard-000000.tar"))] == [
        "k0",
        "k1",
        "k2",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 3 and sum(manifest["skipped"].values()) == 7


def test_strict_build_fails_on_the_first_bad_row(tmp_path, capsys):
    table = bad_input_table(tmp_path)
    code = build_table(table, tmp_path, tmp_path / "shards", "--key-column", "id", "--strict")
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: row 3 (") and "missing_image: no file" in error
    assert len(error.strip().splitlines()) == 1


def big_table(root: Path, rows: int = 240) -> Path:
    for i in range(rows):
        write_image(root / "imgs" / f"b{i}.png", COLORS[i % 8], (400, 300))
    path = root / "big.csv"
    write_table([{"image": f"imgs/b{i}.png", "caption": f"picture {i}"} for i in range(rows)], path)
    return path


def test_interrupted_build_resumes_to_the_same_shards(tmp_path):
    table = big_table(tmp_path)
    common = [
        "--input",
        str(table),
        "--image-root",
        str(tmp_path),
        "--shard-size",
        "10",
        "--image-size",
        "64",
    ]
    assert run_cli("build", *common, "--out", tmp_path / "clean") == 0

    out = tmp_path / "resumed"
    command = [sys.executable, "-m", "polymodal.data.cli", "build", *common, "--out", str(out)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(list((out / ".build").glob("*.json"))) < 3:
        assert process.poll() is None, "the build finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list((out / ".build").glob("*.json")))
    assert 3 <= finished < 24, "killed mid-way"
    assert run_cli("build", *common, "--out", out) == 1  # refuses to overwrite without --resume
    assert run_cli("build", *common, "--out", out, "--resume") == 0
    clean = sorted((tmp_path / "clean").glob("*.tar"))
    assert [p.name for p in sorted(out.glob("*.tar"))] == [p.name for p in clean]
    for shard in clean:
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (out / "sizes.json").read_text() == (tmp_path / "clean" / "sizes.json").read_text()


def test_verify_and_inspect(tmp_path, capsys):
    write_table(good_rows(tmp_path), tmp_path / "c.csv")
    out = tmp_path / "shards"
    assert build_table(tmp_path / "c.csv", tmp_path, out, "--shard-size", "4") == 0
    assert run_cli("verify", str(out / "*.tar")) == 0
    assert "8 good samples, 0 bad" in capsys.readouterr().out

    sheet = tmp_path / "sheet.png"
    assert run_cli("inspect", str(out / "*.tar"), "--sheet", sheet) == 0
    printed = capsys.readouterr().out
    assert "8 samples in 2 shards" in printed and '"caption": "a red square"' in printed
    assert Image.open(sheet).size == (4 * 128, 2 * (128 + 36))

    # corrupt one image and cut the second shard short: both reported, exit code 1
    first = out / "shard-000000.tar"
    data = first.read_bytes()
    with tarfile.open(first) as tar:
        member = tar.getmember("000000001.jpg")
    start = member.offset_data
    first.write_bytes(data[:start] + b"\0" * member.size + data[start + member.size :])
    second = out / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[:1500])
    assert run_cli("verify", str(out / "*.tar")) == 1
    printed = capsys.readouterr().out
    assert f"{first}:000000001: corrupt .jpg" in printed
    assert f"{second}:<tar>: unreadable tar" in printed


def test_training_reads_other_writers_shards_through_the_key_map(tmp_path):
    """webdataset.ShardWriter output with .jpeg images and .caption texts."""
    write_table(good_rows(tmp_path, 4), tmp_path / "c.csv")
    assert (
        build_table(tmp_path / "c.csv", tmp_path, tmp_path / "ours", "--tokenizer-vocab", "300")
        == 0
    )
    other = tmp_path / "other"
    other.mkdir()
    with wds.ShardWriter(str(other / "other-%04d.tar"), maxcount=16) as sink:
        for i in range(32):
            image = io.BytesIO()
            Image.new("RGB", (64, 64), COLORS[i % 8]).save(image, format="JPEG")
            sink.write(
                {
                    "__key__": f"s{i:04d}",
                    "jpeg": image.getvalue(),
                    "caption": f"a {COLORS[i % 8]} square",
                }
            )
    overrides = [
        "debug=fdr",
        f"data.train_shards={other}/*.tar",
        "data.val_shards=null",
        f"data.tokenizer={tmp_path / 'ours' / 'tokenizer.json'}",
        "data.zeroshot=null",
        "data.resampled=true",
        "data.train_samples=32",
        "data.batch_size=8",
        "data.image_keys=[jpeg]",
        "data.text_keys=[caption]",
    ]
    metrics = train(compose_train(overrides, tmp_path / "run", tmp_path))
    assert metrics["train/global_step"] == 1 and metrics["data/skipped_samples"] == 0


def test_audio_build_keeps_clips_and_skips_bad_ones(tmp_path):
    import numpy as np
    import soundfile

    clips = tmp_path / "clips"
    clips.mkdir()
    tone = np.sin(np.linspace(0, 440 * 2 * np.pi, 8000)).astype("float32")
    soundfile.write(clips / "a.wav", tone, 8000)
    soundfile.write(clips / "b.flac", np.stack([tone, tone], axis=1), 16000)
    whole = (clips / "a.wav").read_bytes()
    (clips / "cut.wav").write_bytes(whole[:30])  # header cut short
    (clips / "text.wav").write_bytes(b"not audio at all")
    rows = [
        {"audio": "a.wav", "caption": "a tone"},
        {"audio": "b.flac", "caption": "a stereo tone"},
        {"audio": "cut.wav", "caption": "truncated"},
        {"audio": "text.wav", "caption": "not audio"},
        {"audio": "gone.flac", "caption": "missing"},
    ]
    write_table(rows, tmp_path / "captions.csv")
    out = tmp_path / "shards"
    args = ["build", "--audio-root", clips, "--captions", tmp_path / "captions.csv"]
    assert run_cli(*args, "--out", out) == 0
    samples = read_with_webdataset(str(out / "shard-000000.tar"))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [
        ["json", "txt", "wav"],
        ["flac", "json", "txt"],
    ]
    assert samples[0]["wav"] == whole
    meta = json.loads(samples[1]["json"])
    assert (meta["sample_rate"], meta["channels"], meta["duration_s"]) == (16000, 2, 0.5)
    reasons = [
        json.loads(line)["reason"] for line in (out / "skipped.jsonl").read_text().splitlines()
    ]
    assert reasons == ["unreadable_audio", "unreadable_audio", "missing_audio"]


def test_more_workers_write_the_same_shards(tmp_path):
    table = big_table(tmp_path, rows=40)
    common = ["build", "--input", table, "--image-root", tmp_path, "--shard-size", "10"]
    assert run_cli(*common, "--out", tmp_path / "one") == 0
    assert run_cli(*common, "--out", tmp_path / "three", "--workers", "3") == 0
    for shard in sorted((tmp_path / "one").glob("*.tar")):
        assert (tmp_path / "three" / shard.name).read_bytes() == shard.read_bytes()


def test_audio_build_takes_every_extension_training_reads(tmp_path):
    """.ogg and .mp3 clips are kept as they are, and training's decoder reads them back."""
    import numpy as np
    import soundfile

    from polymodal.data.audio import AudioClips
    from polymodal.data.shards import SampleDecoder

    clips = tmp_path / "clips"
    clips.mkdir()
    tone = 0.5 * np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)).astype("float32")
    soundfile.write(clips / "v.ogg", tone, 16000, format="OGG", subtype="VORBIS")
    soundfile.write(clips / "m.mp3", tone, 16000, format="MP3", subtype="MPEG_LAYER_III")
    rows = [{"audio": "v.ogg", "caption": "a vorbis tone"}, {"audio": "m.mp3", "caption": "an mp3"}]
    write_table(rows, tmp_path / "captions.csv")
    out = tmp_path / "shards"
    args = ["build", "--audio-root", clips, "--captions", tmp_path / "captions.csv"]
    assert run_cli(*args, "--out", out) == 0
    samples = read_with_webdataset(str(out / "shard-000000.tar"))
    assert samples[0]["ogg"] == (clips / "v.ogg").read_bytes()
    assert samples[1]["mp3"] == (clips / "m.mp3").read_bytes()
    decoder = SampleDecoder(modalities=("audio", "text"), audio=AudioClips(False))
    for sample, caption in zip(samples, ["a vorbis tone", "an mp3"], strict=True):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        decoded = decoder.decode(members)
        assert decoded["text"] == caption
        assert decoded["audio"].shape == (32000,) and decoded["audio"].abs().max() > 0.1


def test_an_audio_file_declaring_hours_is_skipped_unread(tmp_path):
    """A small file whose header declares more than training would ever read (a hostile
    clip) is skipped as `audio_too_long` before any of it is decoded."""
    import numpy as np
    import soundfile

    from polymodal.data.build import read_audio
    from polymodal.utils.errors import SkippedSample

    path = tmp_path / "long.flac"
    soundfile.write(path, np.zeros(601 * 1000, dtype=np.float32), 1000, format="FLAC")
    assert path.stat().st_size < 100_000
    with pytest.raises(SkippedSample) as err:
        read_audio(str(path))
    assert err.value.reason == "audio_too_long" and "601000 samples at 1000 Hz" in err.value.detail
