"""Test helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import csv
import io
import json
import socket
import struct
import tarfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from polymodal.data.writing import add_member
from polymodal.models.model import PolymodalModel
from polymodal.train import train
from polymodal.utils.cli import CONFIG_DIR


def tar_members(path: str | Path) -> dict[str, bytes]:
    """name -> bytes of every file member of a tar, in tar order (read with plain tarfile,
    independently of polymodal's readers)."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def samples_by_key(members: Mapping[str, bytes]) -> dict[str, dict[str, bytes]]:
    """Members grouped into samples: key (before the first dot) -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members.items():
        key, extension = name.split(".", 1)
        samples.setdefault(key, {})[extension] = data
    return samples


def write_tar(
    path: str | Path,
    members: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
    tar_format: int = tarfile.DEFAULT_FORMAT,
) -> Path:
    """A tar of `members` (name -> bytes, or (name, bytes) pairs), in that order."""
    items = members.items() if isinstance(members, Mapping) else members
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in items:
            add_member(tar, name, data)
    return Path(path)


def write_uneven_shards(src_dir: Path, out_dir: Path, sizes: list[int]) -> list[str]:
    """Re-pack the samples of `src_dir/*.tar` into shards of the given sizes (+ sizes.json)."""
    members: dict[str, bytes] = {}
    for shard in sorted(src_dir.glob("*.tar")):
        members.update(tar_members(shard))
    samples: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members.items():
        samples.setdefault(name.split(".")[0], []).append((name, data))
    keys = list(samples)
    if sum(sizes) > len(keys):
        raise ValueError(f"{src_dir} has {len(keys)} samples, fewer than {sum(sizes)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    urls, counts, start = [], {}, 0
    for index, size in enumerate(sizes):
        path = out_dir / f"uneven-{index:06d}.tar"
        write_tar(path, [m for key in keys[start : start + size] for m in samples[key]])
        start += size
        counts[path.name] = size
        urls.append(str(path))
    (out_dir / "sizes.json").write_text(json.dumps(counts))
    return urls


def read_wandb_run(path: Path) -> dict:
    """The run record and the final summary of an offline run's `run-<id>.wandb`, which
    wandb.Api cannot open: a LevelDB-style log (32 KiB blocks, records of 7-byte header
    crc32 / length / type, FULL=1 FIRST=2 MIDDLE=3 LAST=4) of wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    run, summary, pending, pos = None, {}, b"", 7  # file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block tail too short for a header: zero padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run = record.run
            elif record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    key = item.key or "/".join(item.nested_key)
                    summary[key] = json.loads(item.value_json)
    return {"run": run, "summary": summary}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group on localhost (one thread per rank: 2 CI cores)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def run_ranks(fn, world: int, *args, timeout: float = 180) -> None:
    """fn(rank, world, port, *args) in `world` spawned processes; raises if one fails, and
    kills them all if they have not finished after `timeout` s (a hung collective)."""
    port = free_port()
    context = mp.start_processes(
        fn, args=(world, port, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world} ranks still running after {timeout} s: a hang")


def tiny_model(
    sharing: str = "separate",
    parts: tuple[str, ...] = (),
    width: int = 32,
    depth: int = 1,
    image_size: int = 32,
    context_length: int = 8,
    vocab_size: int = 50,
    embed_dim: int = 16,
    conv_stem: bool = True,
) -> PolymodalModel:
    """The one small model of the unit tests: a timm ViT (patch 8) and a text tower, or
    one trunk, every stack `depth` x `width` with 2 heads. The conv stem has BatchNorm,
    whose batch statistics differ between a batch and its shares (distributed tests)."""
    size = {"depth": depth, "num_heads": 2}
    return PolymodalModel(
        stems={
            "image": {
                "_target_": "polymodal.models.image.ImageStem",
                "img_size": image_size,
                "patch_size": 8,
                "conv_stem": conv_stem,
            },
            "text": {
                "_target_": "polymodal.models.text.TextStem",
                "vocab_size": vocab_size,
                "context_length": context_length,
            },
        },
        towers={
            "image": {"timm": "vit_tiny_patch16_224", "embed_dim": width, **size},
            "text": {"width": width, **size},
        },
        trunk={"width": width, **size},
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        sharing=sharing,
        parts=parts,
        fusion={"depth": depth, "num_heads": 2},
        decoder={"width": width, "depth": depth, "num_heads": 2},
        mim_decoder={"width": 16, "depth": 1, "num_heads": 2},
    )


def random_batch(size: int, image_size: int = 32, context_length: int = 8, vocab: int = 50) -> dict:
    """A seeded batch for `tiny_model`: images, text ids and right-padded masks."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, context_length + 1, (size,), generator=generator)
    return {
        "image": torch.randn(size, 3, image_size, image_size, generator=generator),
        "text_ids": torch.randint(5, vocab, (size, context_length), generator=generator),
        "text_mask": torch.arange(context_length)[None] < lengths[:, None],
    }


def compose_train(overrides: list[str], output_dir: Path, shapes_dir: Path) -> DictConfig:
    """The `polymodal-train` config with paths redirected to temp dirs (as the CLI would)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.root_dir={output_dir}",
                f"paths.output_dir={output_dir}",
                f"paths.shapes_dir={shapes_dir}",
                *overrides,
            ],
        )
    with open_dict(cfg):
        if "datasets" in (cfg.data.prepare or {}):  # a mix: its joint tokenizer is still made
            cfg.data.prepare.datasets = {}
        else:
            cfg.data.prepare = None  # the fixture already wrote the data
    return cfg


def train_tiny(
    output_dir: Path, shapes_dir: Path, *overrides: str, steps: int = 2
) -> tuple[Path, DictConfig]:
    """A `steps`-step run with checkpoints and CSV logs (one val batch); returns its
    last.ckpt, which carries the run config and tokenizer, and the composed config."""
    base = [
        "logger=csv",
        "callbacks=default",
        "~callbacks.rich_progress_bar",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "+trainer.limit_val_batches=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    cfg = compose_train([*base, *overrides], output_dir, shapes_dir)
    train(cfg)
    return output_dir / "checkpoints" / "last.ckpt", cfg


def logged_steps(csv_path: Path) -> list[int]:
    with open(csv_path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def val_samples(shapes_dir, count: int = 6) -> tuple[list[Image.Image], list[str]]:
    shard = sorted((shapes_dir / "val").glob("*.tar"))[0]
    images, texts = [], []
    for name, data in tar_members(shard).items():
        if name.endswith(".png") and len(images) < count:
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        elif name.endswith(".txt") and len(texts) < count:
            texts.append(data.decode())
    return images, texts


def embeddings_for(scores: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image/text embeddings whose dot products are exactly `scores` [Ni, Nt].

    Images are one-hot directions and texts carry their score column, so image_emb @ text_emb.T
    reproduces the matrix; the metrics only use dot products, so normalisation is not needed.
    """
    s = torch.tensor(scores)
    return torch.eye(s.shape[0]), s.T.contiguous()
