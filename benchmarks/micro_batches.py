"""Memory and speed of one CLIP training step per `model.micro_batch_size`.

    python benchmarks/micro_batches.py                          # tiny model, batch 512, CPU
    python benchmarks/micro_batches.py --batch 256 --micro-batch-sizes 0 64 --device cuda

Each row runs in its own process (so a row's peak memory is its own): synthetic tensors,
AdamW, the CLIP loss over the whole batch. Peak memory is the step's growth of the
process's peak RSS on CPU, or torch's peak allocation on CUDA; 0 encodes the batch at once.
Prints a markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from polymodal.objectives.itc import clip_loss
from polymodal.utils.cli import CONFIG_DIR


def peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def row(args: argparse.Namespace, micro: int, out: mp.Queue) -> None:
    torch.manual_seed(0)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={args.model}",
                "paths.root_dir=.",
                "paths.output_dir=.",
                *args.overrides,
            ],
        )
    model = instantiate(cfg.model, micro_batch_size=micro or None).to(args.device).train()
    size, length = cfg.data.image_size, cfg.data.context_length
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    ids = torch.randint(5, cfg.model.vocab_size, (args.batch, length), device=args.device)
    mask = torch.ones(args.batch, length, dtype=torch.bool, device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scale = torch.tensor(14.0, device=args.device)

    def step() -> None:
        loss = clip_loss(model.embed("image", images), model.embed("text", ids, mask), scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    baseline = peak_mib(args.device)
    step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = args.batch * args.steps / (time.perf_counter() - start)
    out.put((peak_mib(args.device) - baseline, rate))


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
    context = mp.get_context("spawn")
    for micro in args.micro_batch_sizes:
        out = context.Queue()
        process = context.Process(target=row, args=(args, micro, out))
        process.start()
        memory, rate = out.get()
        process.join()
        chunks = -(-args.batch // micro) if micro else 1
        print(f"| {micro or 'null'} | {chunks} | {memory:.0f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
