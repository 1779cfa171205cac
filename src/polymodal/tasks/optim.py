"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from polymodal.utils.errors import ConfigError

_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters that must not be decayed: biases, norms, embeddings, scalars.

    Besides ndim < 2 and norm/embedding modules, honours each submodule's
    `no_weight_decay()` (timm's convention for pos_embed, cls_token, ...).
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, _NO_DECAY_MODULES):
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        if hasattr(module, "no_weight_decay"):
            names.update(prefix + n for n in module.no_weight_decay())
    names.update(n for n, p in model.named_parameters() if p.ndim < 2)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup from 0 over `warmup_steps`, then cosine to `min_lr_ratio` * lr."""
    if total_steps <= 0:
        raise ConfigError("task.scheduler: total steps unknown; set trainer.max_steps > 0")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
