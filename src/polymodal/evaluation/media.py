"""Pictures of an evaluation: confusion matrices and retrieval examples, to files and wandb.

Rendered with matplotlib's Agg canvas (no pyplot, so no global figure state and no
display), to RGB arrays: the same pixels go to PNG files and to wandb. Retrieval examples
also go to CSV, so a run without wandb still has everything on disk.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from polymodal.data.audio import spectrogram_pixels
from polymodal.data.transforms import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger


@dataclass
class RetrievalExamples:
    """A few queries (images, or clips drawn as spectrograms), their own captions and the
    top-k captions retrieved for each; `sounds` the clips' waveforms, for players."""

    images: np.ndarray  # [M, H, W, 3] uint8
    names: list[str]  # sample key (or index) of each image
    captions: list[str]
    retrieved: list[list[str]]
    sounds: np.ndarray | None = None  # [M, samples] float32 at sample_rate
    sample_rate: int | None = None

    def rows(self) -> list[list[str]]:
        return [
            [name, caption, *retrieved]
            for name, caption, retrieved in zip(
                self.names, self.captions, self.retrieved, strict=True
            )
        ]

    def columns(self) -> list[str]:
        k = len(self.retrieved[0]) if self.retrieved else 0
        return ["sample", "caption", *(f"retrieved_{i}" for i in range(1, k + 1))]


def to_uint8(images: Tensor) -> np.ndarray:
    """Pictures of model inputs: preprocessed images [N, 3, H, W] with the CLIP
    normalisation undone, or log-mel spectrograms [N, 1, mels, frames] in a colour map
    (low frequencies at the bottom) -> [N, H, W, 3]."""
    if images.shape[1] == 1:
        return spectrogram_pixels(images)

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def retrieval_examples(
    images: Tensor,
    image_emb: Tensor,
    text_emb: Tensor,
    captions: Sequence[str],
    names: Sequence[str] | None = None,
    k: int = 5,
    sounds: Tensor | None = None,
    sample_rate: int | None = None,
) -> RetrievalExamples:
    """Top-k captions among all `captions` for each of the first M samples, where M is
    the number of `images` given (preprocessed images or spectrograms, the first M of the
    evaluated set; `sounds` their waveforms)."""
    count = len(images)
    scores = image_emb[:count].float() @ text_emb.float().T
    top = scores.topk(min(k, len(captions)), dim=1).indices.tolist()
    return RetrievalExamples(
        images=to_uint8(images),
        names=[str(n) for n in (names if names is not None else range(count))][:count],
        captions=list(captions[:count]),
        retrieved=[[captions[j] for j in row] for row in top],
        sounds=None if sounds is None else sounds[:count].float().cpu().numpy(),
        sample_rate=sample_rate,
    )


def _render(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_image(matrix: Tensor, classes: Sequence[str], title: str) -> np.ndarray:
    """The confusion matrix as a heat map (colour: fraction of the true class; text: count)."""
    counts = matrix.detach().cpu().double()
    recall = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    side = max(3.5, 0.45 * len(classes) + 2)
    figure = Figure(figsize=(side, side), dpi=100)
    axes = figure.add_subplot()
    axes.imshow(recall.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(ticks, classes, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=10)
    if len(classes) <= 20:
        for (row, col), value in np.ndenumerate(counts.numpy().astype(int)):
            colour = "white" if recall[row, col] > 0.5 else "black"
            axes.text(col, row, str(value), ha="center", va="center", fontsize=7, color=colour)
    figure.tight_layout()
    return _render(figure)


def retrieval_image(examples: RetrievalExamples) -> np.ndarray:
    """One row per query image: the image, its caption, and the retrieved captions (green
    where a retrieved caption is the image's own text)."""
    rows = len(examples.images)
    figure = Figure(figsize=(8, 1.3 * rows), dpi=100)
    grid = figure.add_gridspec(
        rows, 2, width_ratios=[1, 5], left=0.01, right=0.99, top=0.98, bottom=0.02, wspace=0.05
    )
    for i in range(rows):
        image_axes, text_axes = figure.add_subplot(grid[i, 0]), figure.add_subplot(grid[i, 1])
        image_axes.imshow(examples.images[i])
        image_axes.axis("off")
        text_axes.axis("off")
        lines = [(examples.captions[i], "black", "bold")] + [
            (f"{j}. {text}", "green" if text == examples.captions[i] else "dimgray", "normal")
            for j, text in enumerate(examples.retrieved[i], start=1)
        ]
        for j, (text, colour, weight) in enumerate(lines):
            y = 1 - j / len(lines)
            text_axes.text(
                0, y, text, va="top", fontsize=7, color=colour, weight=weight, clip_on=True
            )
    return _render(figure)


def save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_media(
    out_dir: Path,
    suffix: str,
    confusion: Mapping[str, tuple[Tensor, Sequence[str]]],
    retrieval: RetrievalExamples | None,
) -> dict[str, np.ndarray]:
    """Write `confusion_<attr><suffix>.png`, `retrieval<suffix>.png` and
    `retrieval<suffix>.csv` under `out_dir`; return the pictures by name for loggers."""
    pictures = {
        f"confusion_{attribute}": confusion_image(matrix, classes, f"zero-shot {attribute}")
        for attribute, (matrix, classes) in confusion.items()
    }
    if retrieval is not None and len(retrieval.images):
        pictures["retrieval"] = retrieval_image(retrieval)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"retrieval{suffix}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(retrieval.columns())
            writer.writerows(retrieval.rows())
    for name, pixels in pictures.items():
        save_png(pixels, out_dir / f"{name}{suffix}.png")
    return pictures


def log_media_to_wandb(
    logger: WandbLogger,
    pictures: Mapping[str, np.ndarray],
    examples: RetrievalExamples | None,
    step: int,
    prefix: str = "val/",
) -> None:
    """Confusion matrices as `<prefix>confusion_<attr>` images and the retrieval examples
    as a `<prefix>retrieval` table (the image or spectrogram, for clips a player, its
    caption, the top-k retrieved captions)."""
    import wandb  # only runs that log to wandb pay for importing it

    for name, pixels in pictures.items():
        if name.startswith("confusion_"):
            logger.log_image(key=f"{prefix}{name}", images=[pixels], step=step)
    if examples is not None:
        data = [
            [wandb.Image(image), *row]
            for image, row in zip(examples.images, examples.rows(), strict=True)
        ]
        columns = ["image", *examples.columns()]
        if examples.sounds is not None:
            players = [wandb.Audio(s, sample_rate=examples.sample_rate) for s in examples.sounds]
            data = [[row[0], player, *row[1:]] for row, player in zip(data, players, strict=True)]
            columns = ["spectrogram", "audio", *examples.columns()]
        logger.log_table(key=f"{prefix}retrieval", columns=columns, data=data, step=step)
