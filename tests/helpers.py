"""Test helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import json
import socket
import struct
import tarfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def write_uneven_shards(src_dir: Path, out_dir: Path, sizes: list[int]) -> list[str]:
    """Re-pack the samples of `src_dir/*.tar` into shards of the given sizes (+ sizes.json)."""
    members: list[tuple[str, bytes]] = []
    for shard in sorted(src_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members:
        samples.setdefault(name.split(".")[0], []).append((name, data))
    keys = list(samples)
    if sum(sizes) > len(keys):
        raise ValueError(f"{src_dir} has {len(keys)} samples, fewer than {sum(sizes)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    urls, counts, start = [], {}, 0
    for index, size in enumerate(sizes):
        path = out_dir / f"uneven-{index:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in keys[start : start + size]:
                for name, data in samples[key]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
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
