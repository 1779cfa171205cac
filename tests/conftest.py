"""Shared fixtures: a tiny shapes dataset and composed configs pointing at temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from polymodal.data.shapes import write_shapes
from polymodal.train import train
from polymodal.utils.cli import CONFIG_DIR

# Tests never talk to wandb servers and must not pick up a SLURM allocation.
os.environ["WANDB_MODE"] = "disabled"
for _name in [n for n in os.environ if n.startswith("SLURM_")]:
    del os.environ[_name]


@pytest.fixture(scope="session", autouse=True)
def wandb_data_dir(tmp_path_factory) -> Path:
    """Offline wandb runs stage table media under WANDB_DATA_DIR (default ~/.local/share/
    wandb) until `wandb sync`; keep the tests' in a temp dir."""
    path = tmp_path_factory.mktemp("wandb_data")
    os.environ["WANDB_DATA_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small shapes dataset shared by the whole session (~1 s to write)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, num_train=512, num_val=128, num_test=64, shard_size=128, seed=0)
    return root


def compose_train(overrides: list[str], output_dir: Path, shapes_dir: Path) -> DictConfig:
    """The `polymodal-train` config with paths redirected to temp dirs (as the CLI would)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.root_dir={output_dir}",
                f"paths.output_dir={output_dir}",
                f"paths.shapes_dir={shapes_dir}",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.data.prepare = None  # the fixture already wrote the data
    return cfg


def train_tiny(
    output_dir: Path, shapes_dir: Path, *overrides: str, steps: int = 2
) -> tuple[Path, DictConfig]:
    """A `steps`-step run with checkpoints and CSV logs (one val batch); returns its
    last.ckpt, which carries the run config and tokenizer, and the composed config."""
    base = [
        "logger=csv",
        "callbacks=default",
        "~callbacks.rich_progress_bar",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "+trainer.limit_val_batches=1",
        "data.batch_size=16",
        "data.num_workers=0",
    ]
    cfg = compose_train([*base, *overrides], output_dir, shapes_dir)
    train(cfg)
    return output_dir / "checkpoints" / "last.ckpt", cfg
