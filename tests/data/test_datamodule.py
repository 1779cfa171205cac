"""The streaming DataModule: shard splitting, bad samples, shard patterns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from polymodal.data.datamodule import TokenizingCollate, WebDataModule
from polymodal.data.shards import SampleDecoder, expand_shards, shard_sizes
from polymodal.data.stream import ShardedSamples
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.utils.errors import ConfigError
from tests.helpers import tar_members, write_tar, write_uneven_shards


def make_dataset(shapes_dir: Path, urls: list[str], **kwargs) -> ShardedSamples:
    tokenizer = TextTokenizer(shapes_dir / "tokenizer.json", 16)
    decoder = SampleDecoder(image_transform(64, train=False))
    sizes = shard_sizes(urls, "test")
    return ShardedSamples(urls, sizes, decoder, TokenizingCollate(tokenizer), **kwargs)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batches_have_the_documented_fields(shapes_dir):
    urls = expand_shards(str(shapes_dir / "val" / "*.tar"), "data.val_shards")
    batch = next(iter(make_dataset(shapes_dir, urls, batch_size=8, shuffle=False)))
    assert batch["image"].shape == (8, 3, 64, 64)
    assert batch["text_ids"].shape == batch["text_mask"].shape == (8, 16)
    assert batch["text_ids"].dtype == torch.long and batch["text_mask"].dtype == torch.bool
    assert len(batch["text"]) == len(batch["key"]) == len(batch["meta"]) == 8
    assert batch["skipped"] == {}


UNEVEN = [37, 101, 64, 9, 50, 120, 3, 128]  # 512 samples in 8 shards of uneven size


def read_epoch(urls, shapes_dir, rank, world, workers, **kwargs) -> list[list[str]]:
    """Keys of each batch one rank reads in one epoch through real worker processes."""
    dataset = make_dataset(shapes_dir, urls, rank=rank, world_size=world, seed=3, **kwargs)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return [batch["key"] for batch in loader]


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 16), (2, 2, 10), (3, 2, 7)])
def test_training_epoch_splits_samples_exactly_over_ranks(
    shapes_dir, tmp_path, world, workers, batch
):
    """Uneven shards: ranks read disjoint samples, take the same number of full batches,
    and together read every sample but the < W*B that would leave ranks uneven."""
    urls = write_uneven_shards(shapes_dir / "train", tmp_path, UNEVEN)
    steps = 512 // (batch * world)
    per_rank = [
        read_epoch(urls, shapes_dir, r, world, workers, batch_size=batch, batches_per_rank=steps)
        for r in range(world)
    ]
    assert [len(batches) for batches in per_rank] == [steps] * world
    assert all(len(b) == batch for batches in per_rank for b in batches)
    keys = [k for batches in per_rank for b in batches for k in b]
    assert len(keys) == len(set(keys)) == steps * batch * world
    assert 512 - len(keys) < batch * world


def test_resampled_epochs_have_equal_full_batches_per_rank(shapes_dir, tmp_path):
    urls = write_uneven_shards(shapes_dir / "train", tmp_path, UNEVEN)
    per_rank = [
        read_epoch(urls, shapes_dir, r, 2, 2, batch_size=10, batches_per_rank=7, resampled=True)
        for r in range(2)
    ]
    assert [[len(b) for b in batches] for batches in per_rank] == [[10] * 7, [10] * 7]
    assert per_rank[0] != per_rank[1]  # each rank draws its own shards


def test_evaluation_splits_every_sample_over_ranks(shapes_dir, tmp_path):
    urls = write_uneven_shards(shapes_dir / "train", tmp_path, UNEVEN)
    per_rank = [
        read_epoch(urls, shapes_dir, r, 3, 2, batch_size=50, shuffle=False) for r in range(3)
    ]
    keys = [k for batches in per_rank for b in batches for k in b]
    assert len(keys) == len(set(keys)) == 512
    assert sorted(sum(len(b) for b in batches) for batches in per_rank) == [170, 171, 171]


def test_short_reader_repeats_samples_to_keep_its_batch_count(shapes_dir, tmp_path):
    """A corrupt sample leaves the rank one short: it still yields all its batches."""
    src = sorted((shapes_dir / "val").glob("*.tar"))[0]
    write_shard_with_corrupt_sample(src, tmp_path / "bad-000000.tar")
    (tmp_path / "sizes.json").write_text(json.dumps({"bad-000000.tar": 128}))
    dataset = make_dataset(
        shapes_dir, [str(tmp_path / "bad-000000.tar")], batch_size=32, batches_per_rank=4
    )
    batches = list(dataset)
    assert [len(b["key"]) for b in batches] == [32] * 4
    keys = keys_of(batches)
    assert len(set(keys)) == 127 and sum(sum(b["skipped"].values()) for b in batches) == 1


def test_shuffle_is_seeded(shapes_dir):
    urls = expand_shards(str(shapes_dir / "train" / "*.tar"), "data.train_shards")

    def order(seed):
        dataset = make_dataset(
            shapes_dir, urls, batch_size=32, batches_per_rank=16, seed=seed, shuffle_buffer=64
        )
        return keys_of(dataset)

    assert order(5) == order(5)
    assert order(5) != order(6)


def write_shard_with_corrupt_sample(src: Path, dst: Path, bad_key_index: int = 3) -> str:
    """Copy a shard, replacing one sample's PNG with garbage bytes."""
    members = tar_members(src)
    bad_key = sorted({name.split(".")[0] for name in members})[bad_key_index]
    write_tar(dst, {**members, f"{bad_key}.png": b"not a png at all"})
    return bad_key


def test_corrupt_sample_is_skipped_and_counted(shapes_dir, tmp_path):
    src = sorted((shapes_dir / "val").glob("*.tar"))[0]
    bad_key = write_shard_with_corrupt_sample(src, tmp_path / "bad-000000.tar")
    (tmp_path / "sizes.json").write_text(json.dumps({"bad-000000.tar": 128}))
    batches = list(
        make_dataset(shapes_dir, [str(tmp_path / "bad-000000.tar")], batch_size=10, shuffle=False)
    )
    keys = keys_of(batches)
    assert bad_key not in keys
    assert len(keys) == 127
    assert sum(sum(b["skipped"].values()) for b in batches) == 1


def test_strict_mode_fails_naming_shard_and_key(shapes_dir, tmp_path):
    src = sorted((shapes_dir / "val").glob("*.tar"))[0]
    shard = tmp_path / "bad-000000.tar"
    bad_key = write_shard_with_corrupt_sample(src, shard)
    (tmp_path / "sizes.json").write_text(json.dumps({"bad-000000.tar": 128}))
    dataset = make_dataset(shapes_dir, [str(shard)], batch_size=10, shuffle=False, strict=True)
    with pytest.raises(ValueError, match=rf"bad-000000\.tar:{bad_key}: corrupt \.png"):
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
    dm.train_samples = 1000
    with pytest.raises(ConfigError, match="data.train_samples: only for data.resampled=true"):
        dm.batches_per_epoch()
    dm.resampled = True
    assert dm.batches_per_epoch() == 10
    assert sum(1 for _ in dm.train_dataloader()) == 10
    with pytest.raises(ConfigError, match="data.tokenizer"):
        WebDataModule(str(shapes_dir / "train" / "*.tar"), None, str(shapes_dir / "x.json")).setup()


def copy_shard(src: Path, dst: Path, drop: str | None = None, rename=None) -> list[str]:
    """Copy a tar shard, leaving out members ending in `drop` and renaming with `rename`."""
    members = {
        rename(name) if rename else name: data
        for name, data in tar_members(src).items()
        if not (drop and name.endswith(drop))
    }
    write_tar(dst, members)
    return list(members)


def test_bad_shards_are_skipped_and_counted_while_training_reads_the_rest(
    shapes_dir, tmp_path, caplog
):
    """A corrupt member, a sample missing its caption, a truncated tar and an empty shard."""
    val = sorted((shapes_dir / "val").glob("*.tar"))[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    copy_shard(val, bad / "good-0.tar")
    write_shard_with_corrupt_sample(val, bad / "corrupt-0.tar")
    copy_shard(val, bad / "nocaption-0.tar", drop="val_00000005.txt")
    whole = (bad / "good-0.tar").read_bytes()
    (bad / "truncated-0.tar").write_bytes(whole[: len(whole) // 2 + 100])
    write_tar(bad / "empty-0.tar", {})
    names = ["good-0.tar", "corrupt-0.tar", "nocaption-0.tar", "truncated-0.tar", "empty-0.tar"]
    (bad / "sizes.json").write_text(json.dumps({n: 0 if "empty" in n else 128 for n in names}))
    data = WebDataModule(
        str(bad / "*.tar"), None, str(shapes_dir / "tokenizer.json"), batch_size=32, num_workers=0
    )
    data.setup("fit")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="polymodal.data"):
        batches = list(data.train_dataloader())
    assert len(batches) == 4 * 128 // 32  # every rank step still happens
    skips = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert sum(sum(b["skipped"].values()) for b in batches) == len(skips) == 4
    joined = "\n".join(skips)
    assert "corrupt-0.tar:val_00000003: corrupt .png (UnidentifiedImageError)" in joined
    assert "nocaption-0.tar:val_00000005: no caption member" in joined
    # the truncated tar: its read error, and the sample it cut in half
    assert sum("truncated-0.tar" in message for message in skips) == 2


def test_no_usable_sample_is_one_clear_error_before_training(shapes_dir, tmp_path):
    src = sorted((shapes_dir / "val").glob("*.tar"))[0]
    copy_shard(src, tmp_path / "nocaptions-0.tar", drop=".txt")
    (tmp_path / "sizes.json").write_text(json.dumps({"nocaptions-0.tar": 128}))
    data = WebDataModule(str(tmp_path / "*.tar"), None, str(shapes_dir / "tokenizer.json"))
    with pytest.raises(
        ConfigError,
        match=r"data.train_shards: no usable sample in 1 shard\(s\) \(first problem: .*no caption",
    ):
        data.setup("fit")


def test_dotted_keys_and_img2dataset_stats(shapes_dir, tmp_path):
    """Keys with dots read whole when the member ends in a known extension; sample counts
    come from img2dataset's <shard>_stats.json when there is no sizes.json."""
    src = sorted((shapes_dir / "val").glob("*.tar"))[0]
    names = copy_shard(
        src, tmp_path / "00000.tar", rename=lambda n: "img." + n.replace("png", "jpeg")
    )
    (tmp_path / "00000_stats.json").write_text(
        json.dumps({"successes": 128, "failed_to_download": 3})
    )
    data = WebDataModule(
        str(tmp_path / "*.tar"),
        None,
        str(shapes_dir / "tokenizer.json"),
        batch_size=32,
        image_keys=["jpeg"],
    )
    data.setup("fit")
    keys = [k for b in data.train_dataloader() for k in b["key"]]
    assert len(set(keys)) == 128 and all(k.startswith("img.val_") for k in keys)
    assert names[0].startswith("img.val_")
