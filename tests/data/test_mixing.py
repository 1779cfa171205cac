"""Mixed sources (data.sources): batch-level sampling by weight, the same source on every
rank, exact resume, the joint tokenizer, and clear errors for bad settings."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from polymodal.data.audio import AudioClips
from polymodal.data.datamodule import TokenizingCollate, WebDataModule
from polymodal.data.mixing import ensure_joint_tokenizer
from polymodal.data.shards import SampleDecoder, expand_shards
from polymodal.data.stream import MixedSamples, ShardedSamples, source_of_batch
from polymodal.data.tokenizer import TextTokenizer
from polymodal.data.transforms import image_transform
from polymodal.train import ddp_for_unused_parameters
from polymodal.utils.errors import ConfigError
from tests.helpers import compose_train


@pytest.mark.parametrize("weights", [{"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0, "c": 2.0}])
def test_sources_are_drawn_in_proportion_to_their_weights(weights):
    """10k batches (4 epochs x 5 workers x 500 batches): each source's share within 2%."""
    draws = [
        source_of_batch(7, epoch, worker, number, weights)
        for epoch in range(4)
        for worker in range(5)
        for number in range(1, 501)
    ]
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs(draws.count(name) / len(draws) - weight / total) < 0.02, name


def mixed(shapes_dir, sounds_dir, rank: int = 0, world: int = 2, batches: int = 12):
    """shapes (image-text) 2 : sounds (audio-text) 1, batches of 8, resampled."""
    tokenizer = TextTokenizer(shapes_dir / "tokenizer.json", 24)
    clips = AudioClips(True, seconds=1.0)
    collate = TokenizingCollate(tokenizer, clips)
    decoders = {
        "shapes": SampleDecoder(image_transform(32, train=True)),
        "sounds": SampleDecoder(modalities=("audio", "text"), audio=clips),
    }
    dirs = {"shapes": shapes_dir, "sounds": sounds_dir}
    parts = {
        name: ShardedSamples(
            expand_shards(str(dirs[name] / "train" / "*.tar"), name),
            None,
            decoders[name],
            collate,
            batch_size=8,
            batches_per_rank=batches,
            rank=rank,
            world_size=world,
            seed=5,
            shuffle_buffer=64,
            resampled=True,
            name=name,
        )
        for name in ("shapes", "sounds")
    }
    return MixedSamples(parts, {"shapes": 2.0, "sounds": 1.0})


def test_every_rank_trains_the_same_source_at_each_step(shapes_dir, sounds_dir):
    ranks = [list(mixed(shapes_dir, sounds_dir, rank=r)) for r in range(2)]
    sources = [[b["source"] for b in batches] for batches in ranks]
    assert sources[0] == sources[1] and set(sources[0]) == {"shapes", "sounds"}
    for batch in ranks[0]:
        image = batch["source"] == "shapes"
        assert ("image" in batch) == image and ("audio" in batch) != image
        assert len(batch["key"]) == 8 and batch["text_ids"].shape == (8, 24)
    keys = [[k for b in batches for k in b["key"]] for batches in ranks]
    assert keys[0] != keys[1]  # each rank draws its own shards and samples


def test_mixed_stream_resumes_exactly_through_loader_workers(shapes_dir, sounds_dir):
    """After 5 trained batches (worker 0's first 3, worker 1's first 2; the loader takes
    them round-robin), the resumed stream yields exactly the uninterrupted run's other
    batches, in order: the same sources, keys and decoded images and spectrograms."""

    def read(dataset):
        return list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2))

    whole = read(mixed(shapes_dir, sounds_dir))
    resumed = mixed(shapes_dir, sounds_dir)
    resumed.start(0, {0: 3, 1: 2}, first=1)  # stream worker 1 is next
    rest = read(resumed)
    assert len(whole) == 12 and len(rest) == 7
    for batch, same in zip(rest, whole[5:], strict=True):
        assert batch["cursor"] == same["cursor"] and batch["source"] == same["source"]
        assert batch["key"] == same["key"]
        for field in ("image", "audio"):
            assert (field in batch) == (field in same)
            if field in batch:
                assert torch.equal(batch[field], same[field])


def test_joint_tokenizer_is_trained_once_on_every_source(shapes_dir, sounds_dir, tmp_path):
    sources = {
        "shapes": {"shards": str(shapes_dir / "train" / "*.tar")},
        "sounds": {"shards": str(sounds_dir / "train" / "*.tar")},
    }
    path = ensure_joint_tokenizer(tmp_path / "joint" / "tokenizer.json", sources, vocab_size=1000)
    tokenizer = Tokenizer.from_file(str(path))
    for word in ("hexagon", "beeps"):  # a word of each source: one token
        assert len(tokenizer.encode(word).ids) == 1, word
    written = path.stat().st_mtime_ns
    assert ensure_joint_tokenizer(path, sources, vocab_size=1000) == path
    assert path.stat().st_mtime_ns == written  # the same sources: not trained again
    ensure_joint_tokenizer(path, sources, vocab_size=800)
    assert path.stat().st_mtime_ns != written  # another vocabulary size: trained again


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_shards": "x.tar"}, "data.sources replaces data.train_shards"),
        ({"resampled": False}, "set data.resampled=true"),
        (
            {"sources": {"a": {"shards": "x.tar", "wieght": 2}}},
            r"data.sources.a: unknown \['wieght'\]",
        ),
        ({"sources": {"a": {"weight": 2}}}, "data.sources.a.shards: required"),
        ({"sources": {"a": {"shards": "x.tar", "modalities": ["audio"]}}}, "not all in"),
        ({"val_shards": "x.tar", "val_sets": {"a": {"shards": "y"}}}, "set data.val_shards=null"),
        ({"val_shards": "x.tar"}, "validate with data.val_sets"),
        ({"val_sets": {"a": {"shards": "y", "zeroshot": {}}}, "zeroshot": {"c": {}}}, "own"),
        ({"val_sets": {"a": {"shards": "y", "modality": ["image"]}}}, r"unknown \['modality'\]"),
        ({"sources": {"a/b": {"shards": "x.tar"}}}, "names are letters"),
        *(
            ({"sources": {"a": {"shards": "x.tar", "weight": w}}}, "data.sources.a.weight")
            for w in (0, -1, "abc", float("nan"), float("inf"), True)
        ),
    ],
)
def test_bad_mix_settings_fail_in_one_line(change, message):
    settings = {
        "train_shards": None,
        "val_shards": None,
        "tokenizer": "t.json",
        "resampled": True,
        "sources": {"a": {"shards": "a.tar"}, "b": {"shards": "b.tar", "weight": 2}},
        **change,
    }
    with pytest.raises(ConfigError, match=message):
        WebDataModule(**settings)


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({"strategy": "ddp", "devices": 2}, "ddp_find_unused_parameters_true"),
        ({"strategy": "ddp_spawn", "devices": 2}, "ddp_spawn_find_unused_parameters_true"),
        ({"strategy": "auto", "devices": 4}, "ddp_find_unused_parameters_true"),
        ({"devices": 1, "num_nodes": 2}, "ddp_find_unused_parameters_true"),
        ({"strategy": "auto", "devices": 1}, "auto"),
        ({"strategy": "fsdp", "devices": 2}, "fsdp"),
        (
            {
                "strategy": {
                    "_target_": "lightning.pytorch.strategies.DDPStrategy",
                    "static_graph": True,
                }
            },
            {
                "_target_": "lightning.pytorch.strategies.DDPStrategy",
                "static_graph": False,
                "find_unused_parameters": True,
            },
        ),
    ],
)
def test_ddp_looks_for_unused_parameters_in_a_mix(trainer, expected):
    """A step of one source leaves the other's stem unused: every DDP form of
    trainer.strategy is made to find unused parameters (others are left alone)."""
    model = {"modalities": ["image", "text"]}
    cfg = OmegaConf.create({"data": {"sources": {"a": {}}}, "model": model, "trainer": trainer})
    ddp_for_unused_parameters(cfg)
    assert OmegaConf.to_container(cfg.trainer).get("strategy", "auto") == expected
    # a language model of text alone leaves its text encoder unused: the same
    text = {"data": {}, "model": {"modalities": ["text"]}, "trainer": dict(trainer)}
    text = OmegaConf.create(text)
    ddp_for_unused_parameters(text)
    assert OmegaConf.to_container(text.trainer).get("strategy", "auto") == expected
    plain = OmegaConf.create({"data": {"sources": {}}, "model": model, "trainer": dict(trainer)})
    ddp_for_unused_parameters(plain)  # no mix: untouched
    assert OmegaConf.to_container(plain.trainer) == trainer


@pytest.mark.parametrize(
    ("overrides", "monitor"),
    [
        ([], "val/shapes/zeroshot/mean_acc"),  # the first set's
        (["data.val_sets.shapes.zeroshot=null"], "val/shapes/retrieval/mean_r1"),
        (
            ["data.val_sets.shapes.zeroshot=null", "task.evaluation.retrieval=false"],
            "val/shapes/loss",
        ),
    ],
)
def test_checkpoint_monitor_follows_the_first_val_set(tmp_path, overrides, monitor):
    cfg = compose_train(["experiment=trimodal", *overrides], tmp_path, tmp_path)
    assert cfg.callbacks.model_checkpoint.monitor == monitor
