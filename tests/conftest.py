"""Shared fixtures: a tiny shapes dataset and composed configs pointing at temp dirs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from polymodal.data.shapes import write_shapes

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


@pytest.fixture(scope="session")
def sounds_dir(tmp_path_factory) -> Path:
    """A small sounds dataset (audio events and captions) for the audio recipes."""
    from polymodal.data.sounds import write_sounds

    root = tmp_path_factory.mktemp("sounds")
    write_sounds(root, num_train=256, num_val=64, num_test=32, shard_size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def requires_espeak() -> None:
    """Skip without Debian's espeak-ng (the spoken dataset's synthesiser), unless
    POLYMODAL_REQUIRE_ESPEAK=1 (set by .ci/run, which installs it) makes that a failure."""
    if shutil.which("espeak-ng") is None:
        message = "espeak-ng not installed (make setup installs it as root; .ci/run always)"
        if os.environ.get("POLYMODAL_REQUIRE_ESPEAK") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def spoken_dir(tmp_path_factory, requires_espeak) -> Path:
    """A small synthesised-speech dataset (espeak-ng utterances and transcripts)."""
    from polymodal.data.spoken import write_spoken

    root = tmp_path_factory.mktemp("spoken")
    write_spoken(root, num_train=160, num_val=32, num_test=16, shard_size=64, seed=0)
    return root
