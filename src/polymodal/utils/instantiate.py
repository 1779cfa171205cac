"""Building from config: callbacks and loggers from their groups, plain config nodes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def plain_dict(cfg: Mapping | None) -> dict:
    """A resolved plain dict of a config node (None -> {}): what objects keep, so that
    checkpoints hold no DictConfig and load with torch's weights_only."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def instantiate_group(group: DictConfig | None, field: str) -> list:
    """Instantiate every `{name: {_target_: ...}}` entry of a config group (callbacks, logger)."""
    if not group:
        return []
    if not isinstance(group, DictConfig):
        raise TypeError(f"{field} must be a mapping of name -> config, got {type(group).__name__}")
    objects = []
    for name, spec in group.items():
        if isinstance(spec, DictConfig) and "_target_" in spec:
            if field == "logger" and name == "wandb":
                spec = wandb_spec(spec)
            objects.append(instantiate(spec))
        elif spec is not None:
            raise ValueError(f"{field}.{name} has no _target_")
    return objects


def wandb_spec(spec: DictConfig) -> DictConfig:
    """Let WANDB_MODE from the environment win over `offline` (Lightning's `offline=True`
    would otherwise overwrite the variable, e.g. turning `disabled` into offline files),
    and derive the run id from the output directory when none is set, so a requeued or
    resumed run continues the same wandb run (Lightning passes resume="allow")."""
    if os.environ.get("WANDB_MODE"):
        spec = OmegaConf.merge(spec, {"offline": False})
    if not spec.get("id"):
        spec = OmegaConf.merge(spec, {"id": run_id(spec.save_dir)})
    return spec


def run_id(output_dir: str) -> str:
    """A wandb run id that is the same for every attempt writing to `output_dir`."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
