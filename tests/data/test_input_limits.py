"""Training-time limits on hostile samples: a decompression-bomb PNG and a huge caption are
refused before they are decoded or tokenised, skipped and counted by reason."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import pytest
from hydra.utils import instantiate
from PIL import Image

from polymodal.data.datamodule import TokenizingCollate
from polymodal.data.shards import SampleDecoder
from polymodal.data.stream import ShardedSamples
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.utils.errors import SkippedSample
from tests.helpers import compose_train, write_tar


def bomb_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A small valid PNG whose header claims width x height pixels (144 Mpx by default):
    what a decoder would allocate, 1.5 GB as RGB, before it sees the data."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def small_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(out, format="PNG")
    return out.getvalue()


def decoder(**limits) -> SampleDecoder:
    return SampleDecoder(image_transform(64, train=True), **limits)


def sample(key: str, png: bytes, caption: bytes) -> dict:
    return {"__key__": key, "__url__": "shard.tar", "png": png, "txt": caption}


def test_bomb_image_is_refused_from_its_header():
    start = time.perf_counter()
    with pytest.raises(SkippedSample) as err:
        decoder()(sample("bomb", bomb_png(), b"a red square"))
    assert time.perf_counter() - start < 1.0  # nothing was decoded
    assert err.value.reason == "too_many_pixels"
    assert "12000x12000" in str(err.value) and "data.max_pixels" in str(err.value)
    # under the limit it is an ordinary image; a lower limit refuses a normal one too
    assert decoder()(sample("ok", small_png(), b"a blue square"))["text"] == "a blue square"
    with pytest.raises(SkippedSample, match="too_many_pixels"):
        decoder(max_pixels=64 * 64 - 1)(sample("ok", small_png(), b"a blue square"))


def test_huge_caption_is_refused_before_tokenising():
    caption = b"word " * 4_000_000  # 20 MB
    start = time.perf_counter()
    with pytest.raises(SkippedSample) as err:
        decoder()(sample("long", small_png(), caption))
    assert time.perf_counter() - start < 1.0
    assert err.value.reason == "caption_too_long" and "data.max_caption_bytes" in str(err.value)


def test_stream_skips_and_counts_over_limit_samples_by_reason(shapes_dir, tmp_path):
    good = [sample(f"good{i:02d}", small_png(), b"a blue square") for i in range(14)]
    bad = [
        sample("bomb", bomb_png(), b"a red square"),
        sample("long", small_png(), b"x" * 70_000),
    ]
    shard = tmp_path / "limits-000000.tar"
    write_tar(
        shard,
        [
            (f"{s['__key__']}.{ext}", s[ext])
            for s in [*good[:5], *bad, *good[5:]]
            for ext in ("png", "txt")
        ],
    )
    (tmp_path / "sizes.json").write_text(json.dumps({shard.name: 16}))
    dataset = ShardedSamples(
        [str(shard)],
        [16],
        decoder(),
        TokenizingCollate(TextTokenizer(shapes_dir / "tokenizer.json", 16)),
        batch_size=7,
        shuffle=False,
    )
    batches = list(dataset)
    keys = [k for b in batches for k in b["key"]]
    assert keys == [s["__key__"] for s in good]
    skipped = sum((list(b["skipped"].items()) for b in batches), [])
    assert sorted(skipped) == [("caption_too_long", 1), ("too_many_pixels", 1)]


def test_limits_are_data_config_keys(tmp_path, shapes_dir):
    cfg = compose_train(["data.max_pixels=100", "data.max_caption_bytes=10"], tmp_path, shapes_dir)
    datamodule = instantiate(cfg.data)
    made = datamodule.decoder(train=True)
    assert (made.max_pixels, made.max_caption_bytes) == (100, 10)


def test_verify_reports_what_training_would_skip():
    from polymodal.data.check import sample_problems

    assert sample_problems({"png": small_png(), "txt": b"a blue square"}) == []
    assert sample_problems({"png": bomb_png(), "txt": b"a red square"}) == [
        "12000x12000 image > data.max_pixels 89478485"
    ]
    assert sample_problems({"png": small_png(), "txt": b"x" * 70_000}) == [
        "caption of 70000 bytes > data.max_caption_bytes 65536"
    ]


def test_verify_and_training_agree_on_what_a_usable_sample_is():
    """One decoder: a `.caption` member is a caption to both, and a sample training skips
    is a verify problem in the same words."""
    from polymodal.data.check import sample_problems

    captioned = {"__key__": "k", "__url__": "s.tar", "png": small_png(), "caption": b"a square"}
    assert decoder()(captioned)["text"] == "a square"
    assert sample_problems({"png": small_png(), "caption": b"a square"}) == []
    for members in ({"png": small_png(), "cls": b"3"}, {"png": b"not a png", "txt": b"a"}):
        with pytest.raises(SkippedSample) as err:
            decoder()({"__key__": "k", "__url__": "s.tar", **members})
        assert err.value.detail.startswith(f"s.tar:k: {sample_problems(members)[0]}")
