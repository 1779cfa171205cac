"""Image <-> audio retrieval through text, on a trimodal checkpoint (experiment=trimodal).

    python benchmarks/cross_modal.py CKPT [--pairs 500] [--images DIR] [--sounds DIR]

No objective trains images against sounds: they meet only through the text tower. The
first N val images and N val clips form N pairs (image k with clip k, an arbitrary
pairing), and pair k's two captions are anchor pair k. Each image's softmax over the image
anchors and each clip's over the audio anchors (`anchor_profiles`, at the model's
temperature) are compared by dot product: image k retrieves clip k when both point at
anchor pair k. Prints R@1/5/10 both ways beside chance (k / N) and the factor over it.

An anchor-consistency check: it is the product of the two modalities' text retrieval, so
two separate models (a CLIP and a CLAP) would score the same; shapes and sounds share no
concept that could tie an image to a sound directly. Ties count for the positive (as in
`retrieval_metrics`): a collapsed encoder would score high, so read it beside the
per-modality retrieval of the run's validation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import polymodal
from polymodal.evaluation.retrieval import anchor_profiles, retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]


def embedded(model: polymodal.Polymodal, modality: str, split_dir: Path, count: int) -> dict:
    model.modality = modality
    result = model.embed_shards(str(split_dir / "*.tar"))
    if len(result["keys"]) < count:
        raise SystemExit(f"{split_dir}: {len(result['keys'])} samples < --pairs {count}")
    return {k: result[k][:count] for k in (modality, "text")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "shapes" / "val")
    parser.add_argument("--sounds", type=Path, default=ROOT / "data" / "sounds" / "val")
    args = parser.parse_args()
    model = polymodal.load(args.ckpt)
    scale = float(model.module.model.contrastive_scale()[0].detach())
    images = embedded(model, "image", args.images, args.pairs)
    sounds = embedded(model, "audio", args.sounds, args.pairs)
    image_profiles = anchor_profiles(images["image"], images["text"], scale)
    sound_profiles = anchor_profiles(sounds["audio"], sounds["text"], scale)
    pairs = torch.arange(args.pairs)
    metrics = retrieval_metrics(image_profiles, sound_profiles, pairs)
    print(f"{args.pairs} image-sound pairs through text anchors ({args.ckpt})")
    print(f"{'direction':<16}{'k':>4}{'recall':>9}{'chance':>9}{'factor':>8}")
    for way, name in (("i2t", "image -> sound"), ("t2i", "sound -> image")):
        for k in (1, 5, 10):
            recall, chance = metrics[f"{way}_r{k}"], k / args.pairs
            print(f"{name:<16}{k:>4}{recall:>9.3f}{chance:>9.3f}{recall / chance:>8.1f}")


if __name__ == "__main__":
    main()
