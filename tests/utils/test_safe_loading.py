"""Opening a checkpoint runs no code of the file's choosing.

Crafted from a real tiny checkpoint: a pickled payload, and stored configs whose
`_target_` (top-level or nested) names something that would create a marker file.
`polymodal.load`, `polymodal-eval` and `polymodal-embed` refuse each with one line, and
the marker never appears. Also: what `polymodal-train` writes loads with weights_only,
and `keys.txt` of `polymodal-embed` maps lines to keys one to one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import polymodal
from polymodal.embed import embed
from polymodal.utils.checkpoint import read_checkpoint
from polymodal.utils.errors import ConfigError
from tests.helpers import tar_members, train_tiny, val_samples, write_tar

# where a hostile `_target_` is put in the stored config
PLACES = ("model", "task.objectives.itc")


class Payload:
    """Unpickling this touches `marker` (pickle calls os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


REFUSED_GLOBAL = f"GLOBAL '{os.system.__module__}.system'"


def hostile(target: str, marker: Path) -> dict:
    """A config node that creates `marker` when hydra instantiates it."""
    if target == "torch.load":  # a second-stage pickle, loaded without weights_only
        torch.save(Payload(marker), marker.with_suffix(".pt"))
        return {"_target_": target, "f": str(marker.with_suffix(".pt")), "weights_only": False}
    return {
        "webdataset.gopen": {"_target_": target, "url": f"pipe:touch {marker}"},
        "builtins.open": {"_target_": target, "file": str(marker), "mode": "w"},
        "subprocess.run": {"_target_": target, "args": ["touch", str(marker)]},
    }[target]


TARGETS = ("webdataset.gopen", "builtins.open", "subprocess.run", "torch.load")


def interpolation(marker: Path) -> str:
    """Not a `_target_` until instantiate resolves it: oc.create builds the node."""
    return f"${{oc.create:{{_target_: builtins.open, file: '{marker}', mode: w}}}}"


def appears(marker: Path, seconds: float) -> bool:
    """Whether `marker` exists within `seconds` (a `pipe:` command runs in the background)."""
    deadline = time.monotonic() + seconds
    while not marker.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def craft(source: Path, out: Path, edit: Callable[[dict], None] | None = None, **extra) -> Path:
    """A copy of the checkpoint `source` with its stored config edited / entries added."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    if edit is not None:
        edit(checkpoint["polymodal"]["config"])
    checkpoint.update(extra)
    torch.save(checkpoint, out)
    return out


def put(place: str, node: dict | str) -> Callable[[dict], None]:
    """An edit replacing the config node at `place` (`task.objectives.itc` keeps its weight)."""

    def edit(config: dict) -> None:
        if place == "model":
            config["model"] = node
        else:
            config["task"]["objectives"]["itc"] = {"weight": 1.0, **node}

    return edit


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_dir) -> Path:
    """last.ckpt of a 2-step CLIP run."""
    return train_tiny(tmp_path_factory.mktemp("run"), shapes_dir)[0]


def refused(path: Path, *names: str) -> str:
    """The message of the ConfigError `polymodal.load(path)` raises; one line naming the
    file and every one of `names`."""
    with pytest.raises(ConfigError) as caught:
        polymodal.load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for name in names:
        assert name in message, message
    return message


@pytest.mark.parametrize("target", TARGETS)
def test_the_payloads_are_live(target, tmp_path):
    """Without the checks, instantiating a crafted node creates the marker; hydra's own
    best-effort blocklist stops only subprocess.run of them."""
    marker = tmp_path / "marker"
    if target == "subprocess.run":
        with pytest.raises(InstantiationException, match="blocklisted"):
            instantiate(hostile(target, marker))
        return
    instantiate(hostile(target, marker))
    assert appears(marker, 5)


def test_an_interpolation_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    instantiate({"_target_": "builtins.dict", "x": interpolation(marker)})
    assert appears(marker, 5)


def test_a_pickled_payload_is_refused(trained, tmp_path):
    marker = tmp_path / "marker"
    path = craft(trained, tmp_path / "payload.ckpt", payload=Payload(marker))
    message = refused(path, REFUSED_GLOBAL, "refused: the file needs code to load")
    assert message.endswith("polymodal checkpoints hold tensors and plain containers only")
    assert not appears(marker, 0.2)


def test_resume_refuses_a_pickled_payload(trained, shapes_dir, tmp_path):
    """As `ckpt_path=`, and as the run's own last.ckpt (auto_resume): checked before
    Lightning reads it; auto_resume falls back to nothing and stops rather than run it."""
    marker = tmp_path / "marker"
    payload = craft(trained, tmp_path / "payload.ckpt", payload=Payload(marker))
    with pytest.raises(ConfigError, match=r"ckpt_path=.*refused: the file needs code"):
        train_tiny(tmp_path / "explicit", shapes_dir, f"ckpt_path={payload}")
    own = tmp_path / "own" / "checkpoints"
    own.mkdir(parents=True)
    (own / "last.ckpt").write_bytes(payload.read_bytes())
    with pytest.raises(ConfigError, match="no checkpoint there loads"):
        train_tiny(tmp_path / "own", shapes_dir)
    assert not appears(marker, 0.2)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_hostile_target_is_refused(trained, tmp_path, target, place):
    marker = tmp_path / "marker"
    path = craft(trained, tmp_path / "hostile.ckpt", put(place, hostile(target, marker)))
    refused(path, f"{place}._target_: {target!r} is refused")
    assert not appears(marker, 0.2)


def test_an_interpolation_is_refused(trained, tmp_path):
    marker = tmp_path / "marker"

    def edit(config: dict) -> None:
        config["model"]["image"] = interpolation(marker)

    refused(craft(trained, tmp_path / "interp.ckpt", edit), "model.image: ", "an interpolation")
    assert not appears(marker, 0.2)


@pytest.mark.parametrize(
    "target",
    ["polymodal.api.torch.load", "polymodal.data.shapes.write_shapes", "polymodal.nope.X"],
)
def test_only_polymodal_modules_are_allowed_under_polymodal(trained, tmp_path, target):
    """A polymodal module path also reaches what the module imported, and polymodal's
    functions write files: only its nn.Module classes may be built."""
    path = craft(trained, tmp_path / "c.ckpt", put("model", {"_target_": target}))
    refused(path, f"model._target_: {target!r} is refused")


def test_unreadable_files_are_one_line_errors(trained, tmp_path):
    data = trained.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    torch.save([1, 2], tmp_path / "list.ckpt")
    expected = {
        "missing.ckpt": "cannot read the checkpoint (No such file or directory)",
        "truncated.ckpt": "truncated or not a checkpoint (not a torch zip archive)",
        "text.ckpt": "truncated or not a checkpoint (not a torch zip archive)",
        "list.ckpt": "not a checkpoint (holds a list)",
        ".": "cannot read the checkpoint (Is a directory)",
    }
    for name, reason in expected.items():
        path = tmp_path / name
        with pytest.raises(ConfigError) as caught:
            read_checkpoint(path)
        assert str(caught.value) == f"{path}: {reason}"


def test_an_untouched_checkpoint_loads_as_before(trained, shapes_dir, tmp_path):
    """Re-saved as the crafted files are, the checkpoint loads and embeds identically."""
    images, texts = val_samples(shapes_dir, 4)
    model = polymodal.load(trained)
    copy = polymodal.load(craft(trained, tmp_path / "copy.ckpt"))
    assert torch.equal(model.encode_image(images), copy.encode_image(images))
    assert torch.equal(model.encode_text(texts), copy.encode_text(texts))


def test_every_checkpoint_of_a_run_loads_with_weights_only(trained):
    """polymodal.load and resuming (Lightning's default torch.load) need weights_only."""
    paths = sorted(trained.parent.glob("*.ckpt"))
    assert trained in paths and len(paths) >= 2  # last.ckpt and the best one
    for path in paths:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert {"state_dict", "optimizer_states", "callbacks", "polymodal"} <= set(checkpoint)


def run_app(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def assert_one_error_line(out: subprocess.CompletedProcess, *names: str) -> None:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and all(n in errors[0] for n in names), errors


@pytest.mark.parametrize(
    "app,crafted",
    [("evaluate", "payload"), ("evaluate", "gopen"), ("embed", "payload"), ("embed", "nested")],
)
def test_apps_refuse_a_crafted_checkpoint(trained, shapes_dir, tmp_path, app, crafted):
    """The real CLIs, run as typed in a fresh directory: one error line, nothing run."""
    marker = tmp_path / "marker"
    if crafted == "payload":
        path, name = craft(trained, tmp_path / "c.ckpt", payload=Payload(marker)), REFUSED_GLOBAL
    elif crafted == "gopen":
        node = hostile("webdataset.gopen", marker)
        path, name = craft(trained, tmp_path / "c.ckpt", put("model", node)), "webdataset.gopen"
    else:
        edit = put("task.objectives.itc", hostile("subprocess.run", marker))
        path, name = craft(trained, tmp_path / "c.ckpt", edit), "task.objectives.itc._target_"
    if app == "evaluate":
        overrides = ["eval=shapes", f"paths.shapes_dir={shapes_dir}"]
    else:
        overrides = [f"shards={shapes_dir / 'test' / '*.tar'}", f"out_dir={tmp_path / 'emb'}"]
    out = run_app(f"polymodal.{app}", f"ckpt_path={path}", *overrides, cwd=tmp_path)
    assert_one_error_line(out, str(path), name)
    assert not appears(marker, 0.2) and not (tmp_path / "emb").exists()


def test_keys_txt_round_trips_any_key(trained, shapes_dir, tmp_path):
    """Keys are tar member names: a newline or backslash in one must not shift lines."""
    members = tar_members(next((shapes_dir / "test").glob("*.tar")))
    sources = sorted({name.split(".")[0] for name in members})[:3]
    keys = ["plain", "two\nlines \\n and a \\ backslash", '"quoted" caf\u00e9']
    shard = tmp_path / "odd-000000.tar"
    odd = {
        f"{key}.{ext}": members[f"{source}.{ext}"]
        for key, source in zip(keys, sources, strict=True)
        for ext in ("png", "txt", "json")
    }
    write_tar(shard, odd, tar_format=tarfile.PAX_FORMAT)
    cfg = OmegaConf.create(
        {
            "ckpt_path": str(trained),
            "device": "cpu",
            "shards": str(shard),
            "batch_size": 8,
            "out_dir": str(tmp_path / "emb"),
        }
    )
    assert embed(cfg)["samples"] == 3
    lines = (tmp_path / "emb" / "keys.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == keys
