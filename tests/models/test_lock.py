"""LiT locking (`model.towers.<modality>.lock`): locked layer groups neither train nor
hold optimizer state, the last `unlocked_groups` do, and frozen BatchNorm statistics stay."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm freezes BatchNorm2d into

from polymodal.tasks.pretrain import build_module
from polymodal.utils.errors import ConfigError
from tests.helpers import tiny_model, train_tiny


def trainable_names(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad}


def test_lock_keeps_the_last_groups_trainable():
    model = tiny_model(depth=2, parts=("logit_scale",))
    model.lock("image", freeze_bn_stats=True)
    assert not trainable_names(model, "encoders.image") and not trainable_names(
        model, "projections.image"
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.encoders["image"].modules())
    text = {n for n, _ in model.named_parameters() if n.startswith("encoders.text")}
    assert trainable_names(model, "encoders.text") == text
    # text groups: stem, block 0, block 1 + final norm, projection: 2 unlocked
    model.lock("text", unlocked_groups=2)
    assert trainable_names(model, "encoders.text") == {
        n for n in text if ".blocks.1." in n or ".norms." in n
    }
    assert trainable_names(model, "projections") == {"projections.text.weight"}
    assert trainable_names(model, "logit_scale") == {"logit_scale"}
    with pytest.raises(
        ConfigError, match=r"model.towers.text.unlocked_groups: must be in \[0, 3\]"
    ):
        model.lock("text", unlocked_groups=4)
    with pytest.raises(ConfigError, match="model.towers.image.lock: needs model.sharing=separate"):
        tiny_model(sharing="multiway").lock("image")


def test_locked_image_tower_does_not_train(tmp_path, shapes_dir):
    """LiT from the command line: 3 steps with the image tower locked (BatchNorm
    statistics frozen) and the text tower's last block group unlocked. Locked weights and
    statistics are bit-identical to the initial ones, the rest moved, and the optimizer
    holds state for the trainable parameters only."""
    overrides = [
        "model.towers.image.lock=true",
        "model.towers.image.freeze_bn_stats=true",
        "model.towers.text.lock=true",
        "model.towers.text.unlocked_groups=2",  # the last block and the projection
    ]
    ckpt, cfg = train_tiny(tmp_path, shapes_dir, *overrides, steps=3)
    L.seed_everything(cfg.seed, workers=True)  # the run's initial weights, as train() made them
    instantiate(cfg.data)
    initial = build_module(cfg)
    start = initial.state_dict()
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    end = checkpoint["state_dict"]
    assert start.keys() == end.keys()
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    frozen = start.keys() - trainable  # locked weights and every buffer (BN statistics)
    assert {n for n in start if n.startswith("model.encoders.image")} <= frozen
    assert "model.projections.image.weight" in frozen
    changed = {n for n in start if not torch.equal(start[n], end[n])}
    assert not changed & frozen, f"locked weights changed: {sorted(changed & frozen)[:3]}"
    assert {"model.projections.text.weight", "model.logit_scale"} <= changed
    assert any(n.startswith("model.encoders.text.blocks.2.") for n in changed)
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(trainable)
