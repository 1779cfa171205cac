"""scikit-learn's bundled handwritten digits as a small real image-caption dataset.

``sklearn.datasets.load_digits()`` ships 1797 real 8x8 scans (ink levels 0..16) inside
scikit-learn, so this dataset needs no network. Each scan becomes a white-on-black RGB PNG
(bilinear to ``image_size``) with a caption naming the digit and a ``{"digit": ...}`` label,
in the same shard layout as the shapes dataset, so training, zero-shot evaluation and the
linear probe read it unchanged.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from polymodal.data.shapes import ensure_dataset
from polymodal.data.tokenizer import train_tokenizer
from polymodal.data.writing import add_sample, atomic_tar, locks_dataset, plan_shards, write_json
from polymodal.utils.errors import ConfigError
from polymodal.utils.files import remove_stale_temps

GENERATOR_VERSION = 1

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"digit": DIGITS}
SPLITS = ("train", "val", "test")
SHARD_PREFIX = "digits-"
# {word} is the class name ("seven"), {numeral} the figure ("7"); most templates use the word,
# which is what zero-shot prompts name.
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a scan of a handwritten {word}",
    "a handwritten {word}",
    "the digit {word}, written by hand",
    "a scan of a handwritten {numeral}",
)
_MAX_INK = 16.0  # load_digits' pixel values run 0..16


def digit_image(scan: np.ndarray, image_size: int) -> Image.Image:
    """An 8x8 scan as a white-on-black RGB image: ink 0..16 -> 0..255, bilinear to size."""
    pixels = np.rint(scan * (255 / _MAX_INK)).astype(np.uint8)
    gray = Image.fromarray(pixels, "L").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return gray.convert("RGB")


def caption(rng: np.random.Generator, label: int) -> tuple[str, int]:
    """A caption for ``label`` and the index of its template."""
    template = int(rng.integers(len(TEMPLATES)))
    return TEMPLATES[template].format(word=DIGITS[label], numeral=label), template


def split_rows(labels: np.ndarray, num_val: int, num_test: int, seed: int) -> dict[str, np.ndarray]:
    """Sorted rows of each split, stratified by class so every split keeps the class balance."""
    rows = np.arange(len(labels))
    rest, test = train_test_split(rows, test_size=num_test, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=num_val, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _write_shard(
    path: Path,
    split: str,
    rows: np.ndarray,
    scans: np.ndarray,
    labels: np.ndarray,
    seed: int,
    image_size: int,
) -> list[str]:
    """Write one shard atomically (tmp file + rename) and return its captions."""
    captions = []
    with atomic_tar(path) as tar:
        for row in rows.tolist():
            label = int(labels[row])
            # seeded per row, so a caption does not depend on the split or the sharding
            text, template = caption(np.random.default_rng([seed, row]), label)
            png = io.BytesIO()
            digit_image(scans[row], image_size).save(png, format="PNG")
            meta = {"digit": DIGITS[label], "label": label, "index": row, "template": template}
            add_sample(tar, f"{split}_{row:04d}", "png", png.getvalue(), text, meta)
            captions.append(text)
    return captions


@locks_dataset
def write_digits(
    out_dir: str | Path,
    num_val: int = 250,
    num_test: int = 250,
    image_size: int = 32,
    shard_size: int = 500,
    seed: int = 0,
    vocab_size: int = 1000,
) -> dict:
    """Write all splits (train gets the rest), their sizes.json, the tokenizer and manifest.

    The manifest is written last, so its presence marks a complete dataset. Runs under the
    directory's lock (`locks_dataset`).
    """
    data = load_digits()
    scans, labels = data.images, data.target
    num_train = len(labels) - num_val - num_test
    if min(num_val, num_test, num_train) < len(DIGITS):
        raise ConfigError(
            f"digits: val ({num_val}) and test ({num_test}) must each be >= {len(DIGITS)} (one "
            f"sample per class) and leave >= {len(DIGITS)} of the {len(labels)} samples for train"
        )
    if image_size < 1 or shard_size < 1:
        raise ConfigError(f"digits: image_size ({image_size}) and shard_size must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    remove_stale_temps(out_dir)

    rows_of = split_rows(labels, num_val, num_test, seed)
    counts = {split: len(rows) for split, rows in rows_of.items()}
    jobs, splits = plan_shards(out_dir, counts, shard_size, SHARD_PREFIX)
    train_captions = []
    for job in jobs:  # in this process: the 1797 scans are small
        rows = rows_of[job.split][job.start : job.start + job.count]
        captions = _write_shard(job.path, job.split, rows, scans, labels, seed, image_size)
        if job.split == "train":
            train_captions += captions
    train_tokenizer(train_captions, out_dir / "tokenizer.json", vocab_size=vocab_size)

    manifest = {
        "name": "digits",
        "source": "sklearn.datasets.load_digits",
        "params": _params(num_val, num_test, image_size, shard_size, seed, vocab_size),
        "splits": splits,
        "attributes": {key: list(values) for key, values in ATTRIBUTES.items()},
        "tokenizer": "tokenizer.json",
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _params(
    num_val: int, num_test: int, image_size: int, shard_size: int, seed: int, vocab_size: int
) -> dict:
    """Everything that determines the written bytes."""
    return {
        "generator_version": GENERATOR_VERSION,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "shard_size": shard_size,
        "seed": seed,
        "vocab_size": vocab_size,
    }


def ensure_digits(out_dir: str | Path, **kwargs) -> dict:
    """Return the existing manifest if it was written with the same parameters, else write.

    Accepts the keyword arguments of ``write_digits`` (see ``shapes.ensure_dataset``).
    """
    out_dir = Path(out_dir)
    bound = inspect.signature(write_digits).bind(out_dir, **kwargs)
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k != "out_dir"}
    return ensure_dataset(out_dir, _params(**arguments), lambda: write_digits(out_dir, **kwargs))
