"""Image preprocessing for training (light augmentation) and evaluation (deterministic)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from polymodal.utils.errors import ConfigError

# CLIP's normalisation constants: a sensible default for natural and synthetic images.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def image_transform(
    image_size: int,
    train: bool,
    crop_scale: Sequence[float] = (0.8, 1.0),
    hflip: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """PIL image -> normalised float tensor [3, image_size, image_size].

    Flips are off by default because captions name left and right. `interpolation`
    (bilinear, bicubic) resizes; open_clip's models expect bicubic.
    """
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"data.interpolation: must be one of {list(INTERPOLATIONS)}, got {interpolation!r}"
        )
    mode = INTERPOLATIONS[interpolation]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if train:
        crop = v2.RandomResizedCrop(
            image_size, scale=tuple(crop_scale), ratio=(1.0, 1.0), interpolation=mode
        )
        flip = [v2.RandomHorizontalFlip()] if hflip else []
        return v2.Compose([v2.ToImage(), crop, *flip, *to_float])
    # resized as a PIL image, as open_clip's eval transform does (the same pixels)
    geometry = [v2.Resize(image_size, interpolation=mode), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, v2.ToImage(), *to_float])
