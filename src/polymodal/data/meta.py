"""What the fields of a sample's json mean to training and evaluation: a label as a class
name, the order of class names, and the field naming a sample's image.

Here, in the data layer, because the shard tools (`polymodal-data values`, zero-shot
`classes: values`) and the evaluators read labels the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

# the json field whose equal values mark samples as captions of one image (COCO's
# `image_id`, which `polymodal-data build` writes): the default `group_by` of every
# evaluator (task.evaluation, eval benchmarks); a sample without it is its own image
IMAGE_ID = "image_id"


def label_name(value: object) -> str | None:
    """A sample's label as a class name: a json string, or a number's text (`3` -> "3");
    None for anything else (missing, null, a list)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)


def sorted_labels(values: Iterable[str]) -> list[str]:
    """Distinct label names, numbers in numeric order ("2" before "10"), then the rest."""

    def order(name: str) -> tuple:
        try:
            return (False, int(name), name)
        except ValueError:
            return (True, 0, name)

    return sorted(set(values), key=order)


def label_indices(metas: Sequence[Mapping], attribute: str, classes: Sequence[str]) -> torch.Tensor:
    """Index in `classes` of each sample's json `attribute` (by name); -1 when absent."""
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index.get(label_name(m.get(attribute)), -1) for m in metas])
