"""Data pipeline throughput: building shards and reading them back for training.

    python benchmarks/data_pipeline.py                 # 64 and 224 px, 1 and 2 workers
    python benchmarks/data_pipeline.py --images 400 --sizes 224 --workers 1 2 4

Build: `polymodal-data build` from generated JPEG photos-like images (480x360), resized
to the target size: images/s, and per worker. Read: the training loader (decode, random
resized crop, tokenise, batch) over those shards: samples/s, and per loader worker.
Prints a markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polymodal.data.build import Encoding, build_shards, table_rows
from polymodal.data.datamodule import WebDataModule


def make_sources(root: Path, count: int) -> Path:
    """Noisy gradient JPEGs (compress like photos, unlike flat colours) and a caption CSV."""
    rng = np.random.default_rng(0)
    (root / "src").mkdir(parents=True)
    rows = []
    for i in range(count):
        base = np.linspace(0, 255, 480)[None, :, None] * rng.random(3)
        pixels = np.clip(base + rng.normal(0, 40, (360, 480, 3)), 0, 255).astype("uint8")
        Image.fromarray(pixels).save(root / "src" / f"{i}.jpg", quality=90)
        rows.append({"image": f"src/{i}.jpg", "caption": f"photo number {i} of a gradient"})
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "captions.csv"


def measure_build(table: Path, out: Path, size: int, workers: int, count: int) -> float:
    """Images per second of a whole build (reading, resizing, encoding, writing tars)."""
    start = time.perf_counter()
    build_shards(
        table_rows(table, table.parent),
        out,
        shard_size=100,
        encoding=Encoding(size, "jpg"),
        workers=workers,
        tokenizer_vocab=300,
    )
    return count / (time.perf_counter() - start)


def measure_read(shards: Path, size: int, workers: int, epochs: int = 2) -> float:
    data = WebDataModule(
        train_shards=str(shards / "*.tar"),
        val_shards=None,
        tokenizer=str(shards / "tokenizer.json"),
        batch_size=32,
        num_workers=workers,
        image_size=size,
    )
    data.setup("fit")
    loader = data.train_dataloader()
    next(iter(loader))  # start the workers
    start, samples = time.perf_counter(), 0
    for _ in range(epochs):
        samples += sum(batch["image"].shape[0] for batch in loader)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{args.images} source JPEGs of 480x360"
    )
    print("| image size | workers | build images/s | per worker | read samples/s | per worker |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        table = make_sources(Path(tmp), args.images)
        for size in args.sizes:
            for workers in args.workers:
                out = Path(tmp) / f"shards-{size}-{workers}"
                built = measure_build(table, out, size, workers, args.images)
                read = measure_read(out, size, workers)
                print(
                    f"| {size} | {workers} | {built:.0f} | {built / workers:.0f} | "
                    f"{read:.0f} | {read / workers:.0f} |"
                )


if __name__ == "__main__":
    main()
