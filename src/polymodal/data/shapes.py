"""Procedurally rendered image-caption dataset ("shapes") written as webdataset shards.

Every image shows one or two coloured shapes on a noisy background, with a caption drawn from
many templates. Captions name each object's shape and colour (and usually its size and position),
so a small model can learn image-text alignment in minutes and zero-shot evaluation can build
prompts from the exported attribute vocabularies.
"""

from __future__ import annotations

import colorsys
import functools
import inspect
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from polymodal.data.tokenizer import train_tokenizer
from polymodal.data.writing import (
    add_sample,
    atomic_tar,
    dataset_lock,
    locks_dataset,
    plan_shards,
    run_shard_jobs,
    sample_rng,
    write_json,
)
from polymodal.utils.files import remove_stale_temps

GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 90, 235),
    "yellow": (245, 215, 35),
    "purple": (145, 50, 205),
    "orange": (250, 135, 25),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
}

SHARD_PREFIX = "shapes-"

# Object extent as a fraction of the image side; the gap between the jittered ranges keeps the
# size label unambiguous.
_SIZE_FRACTION = {"small": 0.30, "large": 0.55}
_SIZE_JITTER = 0.10
_REGION_CENTRE = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
# Jitter moves an object only outward (or along its edge) from its region centre, so positions
# stay unambiguous and two-object scenes barely overlap.
_POSITION_JITTER = 0.06
_OUTWARD = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "centre": (0, 0)}
# Rotation (degrees) that never changes a shape's identity; square/diamond stay fixed so they
# remain distinguishable.
_MAX_ROTATION = {
    "circle": 0.0,
    "square": 0.0,
    "triangle": 12.0,
    "star": 15.0,
    "cross": 10.0,
    "heart": 10.0,
    "diamond": 0.0,
    "hexagon": 15.0,
}
_COLOR_JITTER = 10.0
# Minimum RGB distance between any object colour and the background colour(s).
_MIN_BACKGROUND_DISTANCE = 110.0
_SUPERSAMPLE = 4
_TWO_OBJECT_PROB = 0.25

_POS_AT = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_POS_NEAR = {
    "left": "near the left edge",
    "right": "near the right edge",
    "top": "near the top",
    "bottom": "near the bottom",
    "centre": "near the middle",
}
_POS_SIDE = {
    "left": "left side",
    "right": "right side",
    "top": "top",
    "bottom": "bottom",
    "centre": "centre",
}
# Relation of the first-mentioned object to the second, keyed by the first object's position.
_RELATION = {
    "left": "to the left of",
    "right": "to the right of",
    "top": "above",
    "bottom": "below",
}

SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {at}",
    "there is a {size} {color} {shape} {near}",
    "a picture of a {color} {shape} {at}",
    "{size} {color} {shape}, {side}",
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "an image showing a {size} {color} {shape} {at}",
    "a {size} {shape} in {color} {at}",
    "{at} there is a {size} {color} {shape}",
    "a drawing of a {size} {color} {shape} {near}",
    "one {color} {shape} {at} of the image",
    "the {shape} is {color} and {size}",
    "a {color} {shape}, {size}, {side}",
    "{color} {shape}",
)
# {a} and {b} are noun phrases ("large red circle" or "red circle").
PAIR_TEMPLATES = (
    "a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
    "two shapes: a {a} and a {b}",
    "a {a} and a {b}",
    "a {a} {at_a} and a {b} {at_b}",
    "{a} {at_a}, {b} {at_b}",
    "two objects, a {a} {rel} a {b}",
)
_PAIR_SIZE_PROB = 0.7
_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def _normalise(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's bounding box at the origin and scale its longest side to 2."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) * (2.0 / (hi - lo).max())


def _unit_polygons() -> dict[str, np.ndarray]:
    """Polygons for every shape in [-1, 1]^2 (y points down, as in image coordinates)."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    star_angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    star_radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    hex_angles = np.arange(6) * np.pi / 3
    tri_angles = np.radians([-90, 30, 150])
    w = 0.32
    cross = [
        (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
        (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
    ]  # fmt: skip
    heart_x = 16 * np.sin(t) ** 3
    heart_y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    polygons = {
        "circle": np.stack([np.cos(t), np.sin(t)], axis=1),
        "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
        "triangle": np.stack([np.cos(tri_angles), np.sin(tri_angles)], axis=1),
        "star": np.stack([star_radii * np.cos(star_angles), star_radii * np.sin(star_angles)], 1),
        "cross": np.array(cross, dtype=float),
        "heart": np.stack([heart_x, heart_y], axis=1),
        "diamond": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], dtype=float),
        "hexagon": np.stack([np.cos(hex_angles), np.sin(hex_angles)], axis=1),
    }
    polygons = {name: _normalise(p) for name, p in polygons.items()}
    polygons["square"] *= 0.85  # a full-extent square looks bigger than the other shapes
    return polygons


_UNIT_POLYGONS = _unit_polygons()


def _sample_objects(rng: np.random.Generator) -> list[dict[str, str]]:
    """Pick one or two objects; two objects sit on opposite sides and are never both large."""
    colors = tuple(COLORS)
    if rng.random() >= _TWO_OBJECT_PROB:
        return [
            {
                "shape": str(rng.choice(SHAPES)),
                "color": str(rng.choice(colors)),
                "size": str(rng.choice(SIZES)),
                "position": str(rng.choice(POSITIONS)),
            }
        ]
    pair = [("left", "right"), ("top", "bottom")][rng.integers(2)]
    if rng.random() < 0.5:
        pair = pair[::-1]
    first_size = str(rng.choice(SIZES))
    second_size = "small" if first_size == "large" else str(rng.choice(SIZES))
    return [
        {
            "shape": str(rng.choice(SHAPES)),
            "color": str(rng.choice(colors)),
            "size": size,
            "position": position,
        }
        for size, position in zip((first_size, second_size), pair, strict=True)
    ]


def _background_color(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, dark to light, so it never reads as one of the object colours."""
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.85)
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue, sat, val))


def _background(rng: np.random.Generator, size: int, object_colors: np.ndarray) -> np.ndarray:
    """Solid or linear-gradient background far (in RGB) from every object colour."""
    for _ in range(100):
        start = _background_color(rng)
        end = _background_color(rng) if rng.random() < 0.5 else start
        distance = min(np.linalg.norm(c - o) for c in (start, end) for o in object_colors)
        if distance >= _MIN_BACKGROUND_DISTANCE:
            break
    else:  # practically unreachable; mid grey is far from every object colour
        start = end = np.full(3, 128.0)
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ramp = coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    return (start + ramp[..., None] * (end - start)).astype(np.float32)


def _object_mask(rng: np.random.Generator, obj: dict[str, str], image_size: int) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1] of one object, rendered at 4x and box-downsampled."""
    extent = _SIZE_FRACTION[obj["size"]] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    theta = np.radians(rng.uniform(-1, 1) * _MAX_ROTATION[obj["shape"]])
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shape = _UNIT_POLYGONS[obj["shape"]] @ rotation.T * (extent / 2)
    offset = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2)
    outward = np.array(_OUTWARD[obj["position"]])
    offset = np.where(outward != 0, outward * np.abs(offset), offset)
    centre = np.array(_REGION_CENTRE[obj["position"]]) + offset
    reach = np.abs(shape).max(axis=0)
    centre = np.clip(centre, reach, 1 - reach)  # keep the whole object inside the image
    canvas = image_size * _SUPERSAMPLE
    points = (shape + centre) * canvas
    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points.tolist()], fill=255)
    mask = mask.reduce(_SUPERSAMPLE)
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def _caption(rng: np.random.Generator, objects: list[dict[str, str]]) -> tuple[str, int]:
    """Caption and template index (into SINGLE_TEMPLATES or PAIR_TEMPLATES by object count)."""
    if len(objects) == 1:
        index = int(rng.integers(len(SINGLE_TEMPLATES)))
        obj = objects[0]
        pos = obj["position"]
        text = SINGLE_TEMPLATES[index].format(
            size=obj["size"],
            color=obj["color"],
            shape=obj["shape"],
            at=_POS_AT[pos],
            near=_POS_NEAR[pos],
            side=_POS_SIDE[pos],
        )
    else:
        index = int(rng.integers(len(PAIR_TEMPLATES)))
        first, second = (objects[i] for i in rng.permutation(2))
        with_size = rng.random() < _PAIR_SIZE_PROB

        def noun(obj: dict[str, str]) -> str:
            words = (obj["size"], obj["color"], obj["shape"])
            return " ".join(words if with_size else words[1:])

        text = PAIR_TEMPLATES[index].format(
            a=noun(first),
            b=noun(second),
            rel=_RELATION[first["position"]],
            at_a=_POS_AT[first["position"]],
            at_b=_POS_AT[second["position"]],
        )
    return _ARTICLE.sub("an ", text), index


def _alternatives(values) -> str:
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


_WORDS = {
    "size": SIZES,
    "color": tuple(COLORS),
    "shape": SHAPES,
    "at": tuple(_POS_AT.values()),
    "near": tuple(_POS_NEAR.values()),
    "side": tuple(_POS_SIDE.values()),
    "at_a": tuple(_POS_AT.values()),
    "at_b": tuple(_POS_AT.values()),
    "rel": tuple(_RELATION.values()),
}


def _pattern(template: str) -> re.Pattern:
    """A template as a regex with a named group per placeholder ({a}/{b}: an optional
    size, a colour and a shape); articles as `an?`, checked by re-rendering."""
    noun = rf"(?:(?P<{{0}}_size>{_alternatives(SIZES)}) )?(?P<{{0}}_color>"
    noun += rf"{_alternatives(COLORS)}) (?P<{{0}}_shape>{_alternatives(SHAPES)})"
    parts = re.split(r"(\{\w+\})", template)
    regex = ""
    for part in parts:
        name = part[1:-1] if part.startswith("{") else None
        if name in ("a", "b"):
            regex += noun.format(name)
        elif name is not None:
            regex += f"(?P<{name}>{_alternatives(_WORDS[name])})"
        else:
            regex += re.sub(r"\ba ", "an? ", re.escape(part).replace("\\ ", " "))
    return re.compile(regex)


_SINGLE_PATTERNS = [_pattern(t) for t in SINGLE_TEMPLATES]
_PAIR_PATTERNS = [_pattern(t) for t in PAIR_TEMPLATES]


def parse_caption(text: str) -> list[dict[str, str]] | None:
    """The objects a caption names (each {shape, color, [size]}, and the position of a
    one-object caption that names it), or None when the text does not follow the
    generator's caption grammar with words of its vocabulary: the check of a language
    model's completions. Grammar only: a pair the generator never draws (both on one side)
    still parses."""
    for template, pattern in zip(SINGLE_TEMPLATES, _SINGLE_PATTERNS, strict=True):
        match = pattern.fullmatch(text)
        if match is None:
            continue
        fields = match.groupdict()
        where = {"at": _POS_AT, "near": _POS_NEAR, "side": _POS_SIDE}
        position = next(
            (p for key, names in where.items() for p, v in names.items() if fields.get(key) == v),
            None,
        )
        values = {"at": "", "near": "", "side": "", **fields}
        if _ARTICLE.sub("an ", template.format(**values)) == text:
            obj = {k: fields[k] for k in ("shape", "color", "size") if fields.get(k)}
            return [obj | ({"position": position} if position else {})]
    for template, pattern in zip(PAIR_TEMPLATES, _PAIR_PATTERNS, strict=True):
        match = pattern.fullmatch(text)
        if match is None:
            continue
        fields = match.groupdict()
        objects = [
            {k: fields[f"{n}_{k}"] for k in ("shape", "color", "size") if fields.get(f"{n}_{k}")}
            for n in ("a", "b")
        ]
        if ("size" in objects[0]) != ("size" in objects[1]):
            continue  # the generator sizes both nouns or neither
        nouns = [" ".join(o[k] for k in ("size", "color", "shape") if k in o) for o in objects]
        values = {"rel": "", "at_a": "", "at_b": "", **fields, "a": nouns[0], "b": nouns[1]}
        if _ARTICLE.sub("an ", template.format(**values)) == text:
            return objects
    return None


def render_sample(rng: np.random.Generator, image_size: int = 64) -> tuple[Image.Image, str, dict]:
    """Render one image, its caption and its attributes.

    Top-level "shape"/"color"/"size"/"position" keys exist only for single-object images, so
    zero-shot evaluation can use them as labels and skip two-object scenes.
    """
    objects = _sample_objects(rng)
    base_colors = np.array([COLORS[o["color"]] for o in objects], dtype=np.float32)
    jitter = rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, base_colors.shape)
    colors = base_colors + jitter.astype(np.float32)
    image = _background(rng, image_size, base_colors)
    for obj, color in zip(objects, colors, strict=True):
        alpha = _object_mask(rng, obj, image_size)
        image = image * (1 - alpha) + color * alpha
    noise_std = rng.uniform(1.5, 6.0)
    image += noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    caption, template = _caption(rng, objects)
    attributes: dict = {"objects": objects, "num_objects": len(objects), "template": template}
    if len(objects) == 1:
        attributes.update(objects[0])
    return Image.fromarray(pixels, "RGB"), caption, attributes


def _encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_shard(
    path: Path, split: str, start: int, count: int, seed: int, image_size: int, image_format: str
) -> list[str]:
    """Write one shard atomically (tmp file + rename) and return its captions."""
    captions = []
    with atomic_tar(path) as tar:
        for index in range(start, start + count):
            image, caption, attributes = render_sample(sample_rng(seed, split, index), image_size)
            media = _encode_image(image, image_format)
            add_sample(tar, f"{split}_{index:08d}", image_format, media, caption, attributes)
            captions.append(caption)
    return captions


@locks_dataset
def write_shapes(
    out_dir: str | Path,
    num_train: int = 50_000,
    num_val: int = 1_000,
    num_test: int = 1_000,
    image_size: int = 64,
    shard_size: int = 5_000,
    seed: int = 0,
    image_format: str = "png",
    vocab_size: int = 1000,
    workers: int | None = None,
) -> dict:
    """Generate all splits, their sizes.json files, the tokenizer and the manifest.

    The manifest is written last, so its presence marks a complete dataset. ``workers=None``
    uses up to two processes; the output is byte-identical for any worker count. Runs under
    the directory's lock (`locks_dataset`).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if num_train < 1 or shard_size < 1 or min(num_val, num_test) < 0:
        raise ValueError("num_train and shard_size must be positive, num_val/num_test >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    remove_stale_temps(out_dir)

    counts = {"train": num_train, "val": num_val, "test": num_test}
    jobs, splits = plan_shards(out_dir, counts, shard_size, SHARD_PREFIX)
    write_shard = functools.partial(
        _write_shard, seed=seed, image_size=image_size, image_format=image_format
    )
    results = run_shard_jobs(write_shard, jobs, workers)
    num_train_shards = splits["train"]["num_shards"]  # train jobs come first
    train_captions = [c for captions in results[:num_train_shards] for c in captions]
    train_tokenizer(train_captions, out_dir / "tokenizer.json", vocab_size=vocab_size)

    manifest = {
        "name": "shapes",
        "params": _params(
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            image_size=image_size,
            shard_size=shard_size,
            seed=seed,
            image_format=image_format,
            vocab_size=vocab_size,
        ),
        "splits": splits,
        "attributes": {key: list(values) for key, values in ATTRIBUTES.items()},
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "tokenizer": "tokenizer.json",
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _params(
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int,
    shard_size: int,
    seed: int,
    image_format: str,
    vocab_size: int,
) -> dict:
    """Everything that determines the generated bytes (the worker count does not)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "shard_size": shard_size,
        "seed": seed,
        "image_format": image_format,
        "vocab_size": vocab_size,
    }


def _is_complete(out_dir: Path, manifest: dict) -> bool:
    if not (out_dir / manifest["tokenizer"]).is_file():
        return False
    for split in manifest["splits"]:
        sizes = json.loads((out_dir / split / "sizes.json").read_text())
        if not all((out_dir / split / name).is_file() for name in sizes):
            return False
    return True


def existing_manifest(out_dir: Path, params: dict) -> dict | None:
    """The manifest in ``out_dir`` if a complete dataset was generated there with ``params``.

    Shared by the built-in datasets' ``ensure_*`` functions, which regenerate otherwise.
    """
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("params") != params or not _is_complete(out_dir, manifest):
        return None
    return manifest


def ensure_shapes(out_dir: str | Path, **kwargs) -> dict:
    """Return the existing manifest if it was generated with the same parameters, else generate.

    Accepts the keyword arguments of ``write_shapes`` (see ``ensure_dataset``).
    """
    out_dir = Path(out_dir)
    bound = inspect.signature(write_shapes).bind(out_dir, **kwargs)
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "workers")}
    return ensure_dataset(out_dir, _params(**arguments), lambda: write_shapes(out_dir, **kwargs))


def ensure_dataset(out_dir: Path, params: dict, write: Callable[[], dict]) -> dict:
    """The manifest of the complete dataset in `out_dir`, `write()`n first if missing or
    made with other params. Checked without the lock first (a built dataset on a read-only
    mount needs none), then again under it, so processes starting at once write it once."""
    found = existing_manifest(out_dir, params)
    if found:
        return found
    with dataset_lock(out_dir):
        return existing_manifest(out_dir, params) or write()
