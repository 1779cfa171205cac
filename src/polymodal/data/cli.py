"""``polymodal-data``: command-line tools for building datasets (one subcommand per tool)."""

from __future__ import annotations

import argparse
import time

from polymodal.data.shapes import ensure_shapes, write_shapes


def _add_shapes_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shapes", help="render the procedural shapes image-caption dataset as webdataset shards"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=50_000, help="training samples")
    parser.add_argument("--val", type=int, default=1_000, help="validation samples")
    parser.add_argument("--test", type=int, default=1_000, help="test samples")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=5_000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding")
    parser.add_argument("--vocab-size", type=int, default=1000, help="BPE tokenizer vocab size")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: <= 2)")
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if an identical dataset exists"
    )
    parser.set_defaults(func=_run_shapes)


def _run_shapes(args: argparse.Namespace) -> int:
    generate = write_shapes if args.force else ensure_shapes
    start = time.perf_counter()
    manifest = generate(
        args.out,
        num_train=args.train,
        num_val=args.val,
        num_test=args.test,
        image_size=args.image_size,
        shard_size=args.shard_size,
        seed=args.seed,
        image_format=args.format,
        vocab_size=args.vocab_size,
        workers=args.workers,
    )
    seconds = time.perf_counter() - start
    counts = " ".join(f"{s}={info['num_samples']}" for s, info in manifest["splits"].items())
    print(
        f"shapes: {counts} in {seconds:.1f}s -> {args.out} "
        f"(manifest.json, {manifest['tokenizer']}, {manifest['splits']['train']['pattern']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polymodal-data", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_shapes_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
