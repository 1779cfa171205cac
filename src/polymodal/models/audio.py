"""Audio stem (AST-style): a log-mel spectrogram cut into patches, as a ViT cuts an image.

The spectrogram [B, 1, n_mels, frames] comes from the data pipeline
(polymodal.data.audio.LogMel); patches of `patch_size` (mel bins, frames) are projected
to tokens, a CLS token and learned positions are added, and the trunk's blocks do the
rest. Any sharing mode works: a tower of its own, an audio expert of a multiway trunk, or
the one shared trunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.models.image import keep_patches
from polymodal.models.trunk import Stem


class AudioStem(Stem):
    """Spectrogram patches -> tokens; pooled by the CLS token. A clip of `seconds` gives
    round(seconds * sample_rate) // hop_length frames (as the data pipeline's LogMel cuts
    them); shorter inputs use the first positions, and a spectrogram is zero-padded to
    whole patches."""

    input_key = "audio"
    num_prefix_tokens = 1

    def __init__(
        self,
        width: int,
        n_mels: int = 64,
        seconds: float = 2.0,
        sample_rate: int = 16000,
        hop_length: int = 320,
        patch_size: int | Sequence[int] = (16, 8),
    ) -> None:
        super().__init__()
        frames = int(round(seconds * sample_rate)) // hop_length
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if len(patch) != 2 or min(patch) < 1:
            raise ValueError(f"model.stems.audio.patch_size: (mel bins, frames), got {patch_size}")
        self.patch = patch
        self.grid = (-(-n_mels // patch[0]), -(-frames // patch[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(1, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.num_patches, width) * 0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos"}

    def forward(self, spec: Tensor, keep: Tensor | None = None) -> Tensor:
        bins, frames = spec.shape[-2:]
        spec = F.pad(spec, (0, -frames % self.patch[1], 0, -bins % self.patch[0]))
        x = self.proj(spec)  # [B, width, mel patches, time patches]
        if x.shape[2] != self.grid[0] or x.shape[3] > self.grid[1]:
            raise ValueError(
                f"spectrogram of {bins} mel bins x {frames} frames does not fit the audio stem "
                f"({self.grid[0] * self.patch[0]} bins x {self.grid[1] * self.patch[1]} frames)"
            )
        # positions are laid out mel-major for the full grid; a shorter clip uses its columns
        pos = self.pos[:, 1:].view(1, self.grid[0], self.grid[1], -1)[:, :, : x.shape[3]]
        x = x.permute(0, 2, 3, 1) + pos
        x = x.flatten(1, 2)
        x = torch.cat([(self.cls_token + self.pos[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        return x if keep is None else keep_patches(x, keep, self.num_prefix_tokens)

    def pool(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return tokens[:, 0]
