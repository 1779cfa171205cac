"""Training-step throughput of the CLIP model: samples/s per precision and batch size.

    python benchmarks/clip_step.py                       # the default model, CPU
    python benchmarks/clip_step.py --model tiny --batch-sizes 64 128 256 --device cuda
    python benchmarks/clip_step.py --model base --device cuda --peak-tflops 989 data.image_size=224

Synthetic tensors (no data loading): this measures the model + optimizer step only.
Prints a markdown table with the machine it ran on: samples/s, achieved TFLOP/s (the
step's FLOPs counted once by torch's FLOP counter), MFU against `--peak-tflops` (the
device's dense peak for the precision; e.g. 989 for an H100/H200 in bf16) and, on CUDA,
peak memory.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from polymodal.objectives.itc import clip_loss
from polymodal.utils.cli import CONFIG_DIR


def build_model(model: str, overrides: list[str]) -> tuple[torch.nn.Module, DictConfig]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"model={model}", "paths.root_dir=.", "paths.output_dir=.", *overrides],
        )
    return instantiate(cfg.model), cfg


PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def make_step(model, cfg, batch: int, device: str, precision: str = "32") -> Callable[[], None]:
    """One AdamW step of the CLIP loss on a synthetic batch of `batch` samples."""
    size, length = cfg.data.image_size, cfg.data.context_length
    images = torch.randn(batch, 3, size, size, device=device)
    ids = torch.randint(5, cfg.model.vocab_size, (batch, length), device=device)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = PRECISIONS[precision]
    scale = torch.tensor(14.0, device=device)
    device_type = device.split(":")[0]

    def step() -> None:
        with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype is not None):
            loss = clip_loss(model.embed("image", images), model.embed("text", ids, mask), scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def samples_per_second(step: Callable[[], None], batch: int, device: str, steps: int) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def measure(model, cfg, batch: int, precision: str, device: str, steps: int) -> tuple[float, float]:
    """(samples/s, training FLOPs per sample)."""
    step = make_step(model, cfg, batch, device, precision)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / batch
    for _ in range(2):
        step()
    return samples_per_second(step, batch, device, steps), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak, for MFU")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model.towers.image.depth=6"
    )
    args = parser.parse_args()

    model, cfg = build_model(args.model, args.overrides)
    model.to(args.device).train()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}; model {args.model} ({params:.2f}M params)"
    )
    print("| batch | precision | samples/s | TFLOP/s | MFU | peak memory (GiB) |")
    print("|---:|---|---:|---:|---:|---:|")
    cuda = args.device.startswith("cuda")
    for batch in args.batch_sizes:
        for precision in args.precisions:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            rate, flops = measure(model, cfg, batch, precision, args.device, args.steps)
            tflops = rate * flops / 1e12
            mfu = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "-"
            memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"
            print(f"| {batch} | {precision} | {rate:.0f} | {tflops:.3g} | {mfu} | {memory} |")


if __name__ == "__main__":
    main()
