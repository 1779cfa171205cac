"""``polymodal-data``: command-line tools for building datasets (one subcommand per tool)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

from polymodal.data import build, check, shardtools
from polymodal.data.digits import ensure_digits, write_digits
from polymodal.data.meta import sorted_labels
from polymodal.data.shapes import ensure_shapes, write_shapes
from polymodal.data.shards import TEXT_KEYS, expand_shards
from polymodal.data.sounds import ensure_sounds, write_sounds
from polymodal.data.spoken import ensure_spoken, write_spoken
from polymodal.utils import cli
from polymodal.utils.errors import ConfigError
from polymodal.utils.files import atomic_write_text


def _add_builtin_arguments(
    parser: argparse.ArgumentParser,
    val: int,
    test: int,
    shard_size: int,
    image_size: int | None = None,
) -> None:
    """The options every built-in dataset takes (their defaults differ); --image-size only
    for image datasets, which pass it on in their `extra`."""
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val", type=int, default=val, help="validation samples")
    parser.add_argument("--test", type=int, default=test, help="test samples")
    if image_size is not None:
        parser.add_argument("--image-size", type=int, default=image_size, help="image side (px)")
    parser.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--vocab-size", type=int, default=1000, help="BPE tokenizer vocab size")
    parser.add_argument(
        "--force", action="store_true", help="rewrite even if an identical dataset exists"
    )


def _add_shapes_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shapes", help="render the procedural shapes image-caption dataset as webdataset shards"
    )
    _add_builtin_arguments(parser, val=1_000, test=1_000, shard_size=5_000, image_size=64)
    parser.add_argument("--train", type=int, default=50_000, help="training samples")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: <= 2)")
    parser.set_defaults(
        func=_run_builtin,
        write=write_shapes,
        ensure=ensure_shapes,
        extra=lambda args: {
            "num_train": args.train,
            "image_size": args.image_size,
            "image_format": args.format,
            "workers": args.workers,
        },
    )


def _add_digits_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "digits",
        help="write scikit-learn's bundled handwritten digits as webdataset shards "
        "(train: the samples not in val or test)",
    )
    _add_builtin_arguments(parser, val=250, test=250, shard_size=500, image_size=32)
    parser.set_defaults(
        func=_run_builtin,
        write=write_digits,
        ensure=ensure_digits,
        extra=lambda args: {"image_size": args.image_size},
    )


def _add_sounds_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sounds", help="synthesise the procedural sounds audio-caption dataset as webdataset shards"
    )
    _add_builtin_arguments(parser, val=1_000, test=1_000, shard_size=2_000)
    parser.add_argument("--train", type=int, default=20_000, help="training samples")
    parser.add_argument("--sample-rate", type=int, default=16_000, help="samples per second")
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length in seconds")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: <= 2)")
    parser.set_defaults(
        func=_run_builtin,
        write=write_sounds,
        ensure=ensure_sounds,
        extra=lambda args: {
            "num_train": args.train,
            "sample_rate": args.sample_rate,
            "seconds": args.seconds,
            "workers": args.workers,
        },
    )


def _run_builtin(args: argparse.Namespace) -> int:
    generate = args.write if args.force else args.ensure
    start = time.perf_counter()
    manifest = generate(
        args.out,
        num_val=args.val,
        num_test=args.test,
        shard_size=args.shard_size,
        seed=args.seed,
        vocab_size=args.vocab_size,
        **args.extra(args),
    )
    _print_summary(manifest, args.out, time.perf_counter() - start)
    return 0


def _print_summary(manifest: dict, out: str, seconds: float) -> None:
    """One line for a built-in dataset: sample counts per split, time, what was written."""
    splits = manifest["splits"]  # in train/val/test order (a manifest read back is key-sorted)
    counts = " ".join(f"{s}={splits[s]['num_samples']}" for s in ("train", "val", "test"))
    print(
        f"{manifest['name']}: {counts} in {seconds:.1f}s -> {out} "
        f"(manifest.json, {manifest['tokenizer']}, {splits['train']['pattern']})"
    )


def _add_spoken_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "spoken",
        help="synthesise the spoken digits-and-phrases speech-transcript dataset with espeak-ng "
        "as webdataset shards (val/test transcripts never occur in train)",
    )
    _add_builtin_arguments(parser, val=500, test=500, shard_size=1_000)
    parser.add_argument("--train", type=int, default=8_000, help="training samples")
    parser.add_argument("--sample-rate", type=int, default=16_000, help="clip sample rate (Hz)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: <= 2)")
    parser.set_defaults(
        func=_run_builtin,
        write=write_spoken,
        ensure=ensure_spoken,
        extra=lambda args: {
            "num_train": args.train,
            "sample_rate": args.sample_rate,
            "workers": args.workers,
        },
    )


def _add_build_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build", help="webdataset shards from a caption table or COCO/Flickr caption JSON"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="CSV, TSV, JSONL or parquet caption table")
    source.add_argument("--coco", type=Path, help="COCO captions or Karpathy-split JSON")
    source.add_argument(
        "--audio-root", type=Path, help="audio clips (flac, wav, mp3, ogg); use --captions"
    )
    parser.add_argument("--captions", type=Path, help="caption table of --audio-root clips")
    parser.add_argument("--audio-column", default="audio", help="table column of clip paths")
    parser.add_argument("--image-root", type=Path, default=Path("."), help="image paths base")
    parser.add_argument("--image-column", default="image", help="table column of image paths")
    parser.add_argument("--caption-column", default="caption", help="table column of captions")
    parser.add_argument("--key-column", default=None, help="table column of keys (else row no.)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar")
    parser.add_argument("--shard-size", type=int, default=10_000, help="input rows per shard")
    parser.add_argument("--image-size", type=int, default=256, help="shorter side (0 = keep)")
    parser.add_argument("--format", choices=sorted(build.IMAGE_FORMATS), default="jpg")
    parser.add_argument("--max-pixels", type=int, default=build.DEFAULT_MAX_PIXELS)
    parser.add_argument("--workers", type=int, default=1, help="image-processing processes")
    parser.add_argument("--resume", action="store_true", help="keep finished shards")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad row")
    parser.add_argument("--tokenizer-vocab", type=int, default=None, help="also train a BPE")
    parser.set_defaults(func=_run_build)


def _read_rows(args: argparse.Namespace) -> Iterator[build.Row]:
    if args.coco:
        return build.coco_rows(args.coco, args.image_root)
    if args.audio_root:
        if args.captions is None:
            raise ConfigError("--audio-root needs --captions (a table with audio and caption)")
        return build.table_rows(
            args.captions,
            args.audio_root,
            args.audio_column,
            args.caption_column,
            args.key_column,
            kind="audio",
        )
    return build.table_rows(
        args.input, args.image_root, args.image_column, args.caption_column, args.key_column
    )


def _run_build(args: argparse.Namespace) -> int:
    # the progress bar's total: one extra pass over the table (cheap beside the images)
    total_rows = sum(1 for _ in _read_rows(args)) if cli.interactive() else None
    encoding = build.Encoding(args.image_size or None, args.format, args.max_pixels)
    start = time.perf_counter()
    manifest = build.build_shards(
        _read_rows(args),
        args.out,
        prefix=args.prefix,
        shard_size=args.shard_size,
        encoding=encoding,
        workers=args.workers,
        resume=args.resume,
        strict=args.strict,
        tokenizer_vocab=args.tokenizer_vocab,
        total_rows=total_rows,
    )
    seconds = time.perf_counter() - start
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(manifest["skipped"].items())) or "none"
    print(
        f"build: {manifest['samples']} samples from {manifest['sources']} files in "
        f"{len(manifest['shards'])} shards, {seconds:.1f}s -> {args.out}; skipped: {skipped}"
        + (f" (see {args.out / 'skipped.jsonl'})" if manifest["skipped"] else "")
    )
    return 0


def _add_check_parsers(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser("verify", help="read every sample; report bad ones")
    verify.add_argument("shards", help="shard pattern (braces, globs, '::')")
    verify.set_defaults(func=_run_verify)
    inspect = subparsers.add_parser("inspect", help="counts, keys, samples, contact sheet")
    inspect.add_argument("shards", help="shard pattern (braces, globs, '::')")
    inspect.add_argument("--show", type=int, default=5, help="samples to print")
    inspect.add_argument("--sheet", type=Path, default=None, help="write a contact-sheet PNG")
    inspect.set_defaults(func=_run_inspect)
    for parser in (verify, inspect):
        parser.add_argument(
            "--modalities",
            choices=("image,text", "audio,text"),
            default=None,
            metavar="{image,text | audio,text}",
            help="what a sample must hold (default: audio,text when the first sample with "
            "media has audio and no image, else image,text)",
        )


def _run_verify(args: argparse.Namespace) -> int:
    shards = expand_shards(args.shards, "shards")
    modalities = args.modalities.split(",") if args.modalities else check.shard_modalities(shards)
    good, reports = check.verify(shards, check.decoder_for(modalities))
    for report in reports:
        print(report)
    print(
        f"verify: {good} good samples, {len(reports)} bad, in {len(shards)} shards "
        f"(read as {','.join(modalities)})"
    )
    return 1 if reports else 0


def _run_inspect(args: argparse.Namespace) -> int:
    shards = expand_shards(args.shards, "shards")
    modalities = args.modalities.split(",") if args.modalities else check.shard_modalities(shards)
    decoder = check.decoder_for(modalities)
    summary = check.inspect(shards, args.show, decoder)
    print(
        f"{summary['samples']} samples in {summary['shards']} shards "
        f"(read as {','.join(modalities)})"
    )
    for shard, count in summary["per_shard"].items():
        print(f"  {shard}: {count}")
    print("members: " + ", ".join(f".{e} x{n}" for e, n in sorted(summary["extensions"].items())))
    if summary["bad"]:
        problems = ", ".join(f"{p} x{n}" for p, n in sorted(summary["problems"].items()))
        named = ", ".join(summary["bad_samples"])
        print(f"bad samples: {summary['bad']} ({problems}), e.g. {named}")
    for example in summary["examples"]:
        print(json.dumps(example, ensure_ascii=False))
    if args.sheet:
        count = check.contact_sheet(shards, args.sheet, decoder=decoder)
        tiles = "spectrograms" if "audio" in modalities else "images"
        print(f"contact sheet of {count} {tiles}: {args.sheet}")
    return 0


def _add_shard_tool_parsers(subparsers: argparse._SubParsersAction) -> None:
    count = subparsers.add_parser(
        "count", help="count each shard's samples (tar headers) into the sizes.json beside it"
    )
    count.add_argument("shards", help="shard pattern (braces, globs, '::')")
    count.set_defaults(func=_run_count)
    tokenizer = subparsers.add_parser(
        "tokenizer", help="train a BPE tokenizer.json on the shards' captions"
    )
    tokenizer.add_argument("shards", help="shard pattern (braces, globs, '::')")
    tokenizer.add_argument("--out", type=Path, required=True, help="tokenizer.json to write")
    tokenizer.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    tokenizer.add_argument(
        "--text-keys", nargs="+", default=list(TEXT_KEYS), help="caption members"
    )
    tokenizer.set_defaults(func=_run_tokenizer)
    values = subparsers.add_parser(
        "values", help="distinct values of a json field (or member, e.g. cls) with counts"
    )
    values.add_argument("shards", help="shard pattern (braces, globs, '::')")
    values.add_argument("--field", required=True, help="json field, else member extension")
    values.add_argument("--out", type=Path, default=None, help="write one value per line")
    values.set_defaults(func=_run_values)


def _run_count(args: argparse.Namespace) -> int:
    shards = expand_shards(args.shards, "shards")
    counts = shardtools.write_sizes(shards)
    written = sorted({str(Path(shard).parent / "sizes.json") for shard in shards})
    print(f"count: {sum(counts.values())} samples in {len(shards)} shards -> {', '.join(written)}")
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    shards = expand_shards(args.shards, "shards")
    tokenizer, count = shardtools.caption_tokenizer(
        shards, args.out, args.vocab, args.text_keys, args.shards
    )
    print(
        f"tokenizer: {tokenizer.get_vocab_size()} tokens from {count} captions -> "
        f"{args.out} (model.vocab_size must be at least this)"
    )
    return 0


def _run_values(args: argparse.Namespace) -> int:
    shards = expand_shards(args.shards, "shards")
    counts = shardtools.field_values(shards, args.field)
    if not counts:
        raise ConfigError(f"{args.shards}: no sample has a json field or member {args.field!r}")
    names = sorted_labels(counts)
    for name in names:
        print(f"{counts[name]:>8}  {name}")
    print(f"values: {len(names)} distinct {args.field!r} in {counts.total()} samples")
    if args.out:
        atomic_write_text(args.out, "".join(f"{name}\n" for name in names))
        print(f"one per line -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polymodal-data", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_shapes_parser(subparsers)
    _add_digits_parser(subparsers)
    _add_sounds_parser(subparsers)
    _add_spoken_parser(subparsers)
    _add_build_parser(subparsers)
    _add_check_parsers(subparsers)
    _add_shard_tool_parsers(subparsers)
    for choice in subparsers._choices_actions:  # `<command> --help` opens with its summary
        subparsers.choices[choice.dest].description = choice.help
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        if cli.report(err):  # one line for a user error (utils/cli.py); a bug keeps its traceback
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
