"""The streaming DataModule: shard splitting, bad samples, shard patterns."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from polymodal.data.datamodule import (
    SampleDecoder,
    ShardedSamples,
    TokenizingCollate,
    WebDataModule,
    expand_shards,
)
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.utils.errors import ConfigError


def make_dataset(shapes_dir: Path, urls: list[str], **kwargs) -> ShardedSamples:
    tokenizer = TextTokenizer(shapes_dir / "tokenizer.json", 16)
    decoder = SampleDecoder(image_transform(64, train=False))
    return ShardedSamples(urls, decoder, TokenizingCollate(tokenizer), **kwargs)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batches_have_the_documented_fields(shapes_dir):
    urls = expand_shards(str(shapes_dir / "val" / "*.tar"), "data.val_shards")
    batch = next(iter(make_dataset(shapes_dir, urls, batch_size=8, shuffle=False)))
    assert batch["image"].shape == (8, 3, 64, 64)
    assert batch["text_ids"].shape == batch["text_mask"].shape == (8, 16)
    assert batch["text_ids"].dtype == torch.long and batch["text_mask"].dtype == torch.bool
    assert len(batch["text"]) == len(batch["key"]) == len(batch["meta"]) == 8
    assert batch["skipped"] == 0


def test_ranks_and_workers_read_disjoint_shards_covering_the_epoch(shapes_dir):
    """2 ranks x 2 workers (real worker processes), non-resampled: every key exactly once."""
    urls = expand_shards(str(shapes_dir / "train" / "*.tar"), "data.train_shards")
    seen = []
    for rank in range(2):
        dataset = make_dataset(
            shapes_dir, urls, batch_size=16, rank=rank, world_size=2, partial=True, seed=3
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        seen.append(keys_of(loader))
    assert not set(seen[0]) & set(seen[1])
    all_keys = seen[0] + seen[1]
    assert len(all_keys) == len(set(all_keys)) == 512


def test_shuffle_is_seeded(shapes_dir):
    urls = expand_shards(str(shapes_dir / "train" / "*.tar"), "data.train_shards")

    def order(seed):
        return keys_of(make_dataset(shapes_dir, urls, batch_size=32, seed=seed, shuffle_buffer=64))

    assert order(5) == order(5)
    assert order(5) != order(6)


def write_shard_with_corrupt_sample(src: Path, dst: Path, bad_key_index: int = 3) -> str:
    """Copy a shard, replacing one sample's PNG with garbage bytes."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        members = tin.getmembers()
        keys = sorted({m.name.split(".")[0] for m in members})
        bad_key = keys[bad_key_index]
        for member in members:
            data = tin.extractfile(member).read()
            if member.name == f"{bad_key}.png":
                data = b"not a png at all"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return bad_key


def test_corrupt_sample_is_skipped_and_counted(shapes_dir, tmp_path):
    src = sorted((shapes_dir / "val").glob("*.tar"))[0]
    bad_key = write_shard_with_corrupt_sample(src, tmp_path / "bad-000000.tar")
    batches = list(
        make_dataset(
            shapes_dir,
            [str(tmp_path / "bad-000000.tar")],
            batch_size=10,
            shuffle=False,
            partial=True,
        )
    )
    keys = keys_of(batches)
    assert bad_key not in keys
    assert len(keys) == 127
    assert sum(b["skipped"] for b in batches) == 1


def test_strict_mode_fails_naming_shard_and_key(shapes_dir, tmp_path):
    src = sorted((shapes_dir / "val").glob("*.tar"))[0]
    shard = tmp_path / "bad-000000.tar"
    bad_key = write_shard_with_corrupt_sample(src, shard)
    dataset = make_dataset(shapes_dir, [str(shard)], batch_size=10, shuffle=False, strict=True)
    with pytest.raises(ValueError, match=rf"bad-000000\.tar:{bad_key}: cannot decode"):
        list(dataset)


def test_shard_patterns(shapes_dir):
    braces = expand_shards(str(shapes_dir / "train" / "shapes-{000000..000003}.tar"), "f")
    globbed = expand_shards(str(shapes_dir / "train" / "*.tar"), "f")
    assert braces == globbed and len(braces) == 4
    joined = expand_shards(f"{braces[0]}::{braces[1]}", "f")
    assert joined == braces[:2]
    with pytest.raises(ConfigError, match="data.train_shards: no shard matches"):
        expand_shards(str(shapes_dir / "nothing-*.tar"), "data.train_shards")


def test_epoch_length_from_sizes_json(shapes_dir):
    sizes = json.loads((shapes_dir / "train" / "sizes.json").read_text())
    dm = WebDataModule(
        train_shards=str(shapes_dir / "train" / "*.tar"),
        val_shards=None,
        tokenizer=str(shapes_dir / "tokenizer.json"),
        batch_size=100,
    )
    assert dm.batches_per_epoch() == sum(sizes.values()) // 100
    dm.setup()
    loader = dm.train_dataloader()
    assert sum(1 for _ in loader) == 5
    with pytest.raises(ConfigError, match="data.tokenizer"):
        WebDataModule(str(shapes_dir / "train" / "*.tar"), None, str(shapes_dir / "x.json")).setup()
