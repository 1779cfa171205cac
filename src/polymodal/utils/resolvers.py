"""The `${polymodal.*}` OmegaConf resolvers of the config tree, registered in one place.

`hydra_app` (utils/cli.py) calls `register()` when it wraps an app, so every app resolves
the same names; a config composed without an app (a test, a notebook) calls it itself.

- `polymodal.cwd`: the launch directory for conf/paths (Hydra's `${hydra:runtime.cwd}` is
  unset while a multirun resolves its sweep dir); jobs run where they were launched
- `polymodal.sweep_group`, `polymodal.run_name`: the wandb group and run name of a
  sweep's jobs (conf/logger/wandb.yaml)
- `polymodal.optimized_metric`, `polymodal.metric_mode`: the best checkpoint's monitor
  and mode (conf/callbacks), `optimized_metric: auto` resolved (utils/monitor.py)
- `polymodal.help_groups`: the `--help` group list (conf/hydra/help/polymodal.yaml)
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from polymodal.utils.monitor import metric_mode, optimized_metric

# the keys a multirun's command line sweeps, for its jobs' wandb run names (written by
# hydra_app, inherited by the jobs, also those submitit starts on SLURM)
SWEPT_KEYS = "POLYMODAL_SWEPT_KEYS"


def register() -> None:
    """Register every `polymodal.*` resolver (again: replacing is harmless)."""
    resolvers = {
        "polymodal.cwd": os.getcwd,
        "polymodal.sweep_group": sweep_group,
        "polymodal.run_name": run_name,
        "polymodal.optimized_metric": lambda *, _root_: optimized_metric(_root_),
        "polymodal.metric_mode": lambda *, _root_: metric_mode(optimized_metric(_root_)),
        "polymodal.help_groups": help_groups,
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)


def _multirun_job() -> DictConfig | None:
    """The Hydra config of this job when it is one point of a multirun (-m), else None
    (a single run, or a config composed without a Hydra app, as tests and notebooks do)."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return hydra if hydra.mode == RunMode.MULTIRUN else None


def sweep_group(output_dir: str, log_dir: str) -> str | None:
    """`${polymodal.sweep_group:...}`, the wandb group: in a multirun, the sweep dir (the
    parent of each job's output dir; relative to `log_dir` when under it, e.g.
    `train/multiruns/<time>`). Every job of one sweep resolves the same, also as separate
    SLURM jobs and after a requeue. A single run has no group (None)."""
    if _multirun_job() is None:
        return None
    sweep_dir, log_dir_path = Path(output_dir).parent, Path(log_dir)
    if sweep_dir.is_relative_to(log_dir_path):
        return str(sweep_dir.relative_to(log_dir_path))
    return sweep_dir.name


def run_name(default: str) -> str:
    """`${polymodal.run_name:${task_name}}`, the wandb run name: the experiment, and in a
    multirun the values its job sweeps (e.g. `clip_shapes:task.optimizer.lr=0.001`; the
    fixed overrides every job shares are left out). `default` without an experiment or a
    Hydra app."""
    if not HydraConfig.initialized():
        return default
    hydra = HydraConfig.get()
    name = hydra.runtime.choices.get("experiment") or default
    if _multirun_job() is None:
        return name
    swept = job_swept_keys(hydra)
    overrides = ",".join(o for o in hydra.overrides.task if override_key(o) in swept)
    return f"{name}:{overrides}" if overrides else name


def job_swept_keys(hydra: DictConfig) -> set[str]:
    """The keys a multirun sweeps: those of the command line (`SWEPT_KEYS`, set by the app
    that launched the sweep and inherited by its jobs, also SLURM's) and an Optuna-style
    sweeper's `params`."""
    keys = {key for key in os.environ.get(SWEPT_KEYS, "").split(",") if key}
    return keys | set(OmegaConf.select(hydra, "sweeper.params") or {})


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`."""
    return override.partition("=")[0].lstrip("+~")


def help_groups(*, _root_: DictConfig) -> str:
    """`group: options (now: choice)` for each config group the app composed (Hydra's
    `$APP_CONFIG_GROUPS` lists every folder of the config tree, which the apps share)."""
    loader = GlobalHydra.instance().config_loader()
    lines = []
    # Hydra records the choices last group first; an optional group without files is left out
    for group, choice in reversed(_root_.hydra.runtime.choices.items()):
        options = loader.get_group_options(group)
        if options and group != "hydra" and not group.startswith("hydra/"):
            lines.append(f"{group}: {', '.join(options)} (now: {choice or 'none'})")
    return "\n".join(lines) or "none"
