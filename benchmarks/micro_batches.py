"""Memory and speed of one CLIP training step per `model.micro_batch_size`.

    python benchmarks/micro_batches.py                          # tiny model, batch 512, CPU
    python benchmarks/micro_batches.py --batch 256 --micro-batch-sizes 0 64 --device cuda

Each row runs in its own process (so a row's peak memory is its own): synthetic tensors,
AdamW, the CLIP loss over the whole batch. Peak memory is the step's growth of the
process's peak RSS on CPU, or of torch's peak allocation on CUDA (`isolated.PeakMemory`);
0 encodes the batch at once. The model and step are `clip_step.py`'s.
Prints a markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import platform

import torch
from clip_step import build_model, make_step, samples_per_second
from isolated import PeakMemory, in_fresh_process


def row(args: argparse.Namespace, micro: int) -> tuple[float, float]:
    """(step peak memory growth in MiB, samples/s) with `model.micro_batch_size=micro`."""
    torch.manual_seed(0)
    size = f"model.micro_batch_size={micro or 'null'}"
    model, cfg = build_model(args.model, [*args.overrides, size])
    model.to(args.device).train()
    step = make_step(model, cfg, args.batch, args.device)
    with PeakMemory(args.device) as memory:
        step()  # the first step also allocates AdamW's state
    return memory.mib, samples_per_second(step, args.batch, args.device, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[0, 256, 128, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model.towers.image.depth=6"
    )
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}; model {args.model}, batch {args.batch}"
    )
    print("| micro_batch_size | chunks | step peak memory (MiB) | samples/s |")
    print("|---:|---:|---:|---:|")
    for micro in args.micro_batch_sizes:
        memory, rate = in_fresh_process(row, args, micro)
        chunks = -(-args.batch // micro) if micro else 1
        print(f"| {micro or 'null'} | {chunks} | {memory:.0f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
