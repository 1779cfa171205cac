import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polymodal.data.cli import main
from polymodal.data.shapes import (
    ATTRIBUTES,
    ensure_shapes,
    parse_caption,
    render_sample,
    write_shapes,
)
from tests.helpers import samples_by_key, tar_members

SMALL = {"num_train": 40, "num_val": 8, "num_test": 8, "shard_size": 16, "image_size": 32}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("*/*.tar"))
    }


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    return samples_by_key(tar_members(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    return root, write_shapes(root, seed=0, workers=1, **SMALL)


def test_deterministic_and_worker_independent(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = dataset
    write_shapes(tmp_path / "same", seed=0, workers=2, **SMALL)
    write_shapes(tmp_path / "other", seed=1, workers=1, **SMALL)
    reference = _digests(root)
    assert len(reference) == 3 + 1 + 1
    assert _digests(tmp_path / "same") == reference
    other = _digests(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert all(other[name] != reference[name] for name in reference)


def test_shards_readable_and_sizes_match(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    for split, info in manifest["splits"].items():
        sizes = json.loads((root / split / "sizes.json").read_text())
        assert len(sizes) == info["num_shards"]
        assert sum(sizes.values()) == info["num_samples"]
        for name, count in sizes.items():
            samples = _read_shard(root / split / name)
            assert len(samples) == count
            for key, sample in samples.items():
                assert key.startswith(f"{split}_") and "." not in key
                assert sample.keys() == {"png", "txt", "json"}
                assert sample["txt"].decode("utf-8").strip()
                attributes = json.loads(sample["json"])
                assert attributes["num_objects"] == len(attributes["objects"])
                image = Image.open(io.BytesIO(sample["png"]))
                assert image.mode == "RGB" and image.size == (32, 32)


def test_manifest(dataset: tuple[Path, dict]) -> None:
    root, manifest = dataset
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["splits"]["train"]["pattern"] == "train/shapes-{000000..000002}.tar"
    assert len(manifest["attributes"]["shape"]) >= 6
    assert len(manifest["attributes"]["color"]) >= 8
    assert manifest["attributes"] == {k: list(v) for k, v in ATTRIBUTES.items()}
    assert (root / manifest["tokenizer"]).is_file()


def test_captions_name_attributes() -> None:
    num_pairs = 0
    for index in range(200):
        image, caption, attributes = render_sample(np.random.default_rng(index), image_size=32)
        assert image.size == (32, 32)
        for obj in attributes["objects"]:
            assert obj["shape"] in caption and obj["color"] in caption
        if attributes["num_objects"] == 1:
            for key in ATTRIBUTES:
                assert attributes[key] == attributes["objects"][0][key]
        else:
            num_pairs += 1
            assert "shape" not in attributes
            assert attributes["objects"][0]["position"] != attributes["objects"][1]["position"]
    assert 0 < num_pairs < 100


def test_every_generated_caption_parses_to_its_objects() -> None:
    """parse_caption (the check of a language model's completions) reads back what the
    generator wrote: the objects' shapes and colours, and sizes and positions it names."""
    for index in range(2000):
        _, caption, attributes = render_sample(np.random.default_rng(index), image_size=16)
        parsed = parse_caption(caption)
        assert parsed is not None, caption
        objects = attributes["objects"]
        assert len(parsed) == len(objects), caption
        if not parsed[0].items() <= objects[0].items():
            objects = objects[::-1]  # a pair caption may name either object first
        for named, obj in zip(parsed, objects, strict=True):
            assert named.items() <= obj.items(), caption
            assert {"shape", "color"} <= set(named)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on the",  # cut short
        "a red red circle",
        "a pink circle",  # no such colour
        "a orange star",  # the generator writes "an orange"
        "a small red circle and a blue star",  # sizes both nouns or neither
        "a red circle at the top on the left",
        "A red circle",
    ],
)
def test_text_the_generator_cannot_write_does_not_parse(text: str) -> None:
    assert parse_caption(text) is None


def test_ensure_does_not_regenerate(tmp_path: Path) -> None:
    first = ensure_shapes(tmp_path, workers=1, **SMALL)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert ensure_shapes(tmp_path, workers=1, **SMALL) == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes
    changed = ensure_shapes(tmp_path, workers=1, **{**SMALL, "num_val": 4})
    assert changed["splits"]["val"]["num_samples"] == 4
    assert json.loads((tmp_path / "val" / "sizes.json").read_text()) == {"shapes-000000.tar": 4}


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["shapes", "--out", str(tmp_path), "--train", "20", "--val", "4", "--test", "4"]
    argv += ["--shard-size", "8", "--image-size", "32", "--format", "jpg", "--workers", "1"]
    assert main(argv) == 0
    assert "train=20" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["image_format"] == "jpg"
    assert "train_00000000" in _read_shard(tmp_path / "train" / "shapes-000000.tar")
    assert main([*argv, "--force"]) == 0
