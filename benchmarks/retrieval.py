"""Retrieval evaluation at scale: time and peak memory of `retrieval_metrics` per chunk size.

    python benchmarks/retrieval.py                                  # 10k images x 5 captions
    python benchmarks/retrieval.py --images 5000 --captions 5 --chunk-sizes 256 1024 --device cuda

Random unit embeddings (dimension --dim), COCO-shaped: each image has --captions captions.
Each setting runs in a fresh process so its peak resident memory (CPU) or peak allocated
memory (CUDA) is its own; the full score matrix would need images x texts x 4 bytes.
Prints a markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from isolated import PeakMemory, in_fresh_process

from polymodal.evaluation.retrieval import retrieval_metrics


def run(images: int, captions: int, dim: int, chunk: int, device: str) -> tuple[float, float]:
    """(seconds, peak extra memory in MiB) of one chunk size."""
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(images, dim, generator=generator), dim=-1).to(device)
    text = F.normalize(torch.randn(images * captions, dim, generator=generator), dim=-1)
    text = text.to(device)
    text_to_image = torch.arange(images).repeat_interleave(captions)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        retrieval_metrics(image, text, text_to_image, chunk_size=chunk)
        seconds = time.perf_counter() - start
    return seconds, memory.mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    texts = args.images * args.captions
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, device {args.device}"
    )
    print(
        f"{args.images} images x {texts} captions, dim {args.dim}; the full score matrix "
        f"would be {args.images * texts * 4 / 2**30:.1f} GiB\n"
    )
    print("| chunk size | seconds | peak extra memory (MiB) |")
    print("|---:|---:|---:|")
    for chunk in args.chunk_sizes:
        seconds, peak = in_fresh_process(
            run, args.images, args.captions, args.dim, chunk, args.device
        )
        print(f"| {chunk} | {seconds:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
