"""Opening a checkpoint without running code from it.

A checkpoint is a pickle, and `polymodal.load` builds the model from the config stored
in it, so a file from elsewhere could run code twice over: through a pickled object, and
through a `_target_` that hydra's `instantiate` imports and calls (`webdataset.gopen` with
a `pipe:` URL runs a shell command). `read_checkpoint` unpickles tensors and plain
containers only; `check_targets` refuses every `_target_` but polymodal's nn.Module classes
and torch's optimizers and LR schedulers before anything is called (or imported, but for
polymodal's own modules).
"""

from __future__ import annotations

import importlib
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from polymodal.utils.errors import ConfigError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_PLAIN = "polymodal checkpoints hold tensors and plain containers only"
_INTERPOLATION = "an interpolation, which could build an unchecked _target_"
_ALLOWED = "allowed: polymodal nn.Module classes, torch.optim optimizers and LR schedulers"


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path`, unpickled with torch's weights_only (a pickled object
    cannot run code) and memory-mapped (optimizer state is never read into memory).
    Every failure is a one-line ConfigError naming the file."""
    try:
        with open(path, "rb") as file:
            archive = zipfile.is_zipfile(file)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the checkpoint ({err.strerror})") from None
    if not archive:  # torch.save writes a zip; a truncated one has lost its directory
        raise ConfigError(f"{path}: truncated or not a checkpoint (not a torch zip archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:  # what the weights-only unpickler refuses
        found = _GLOBAL.search(str(err))
        what = (
            f"needs code to load (unpickling GLOBAL {found[1]!r} is not allowed)"
            if found
            else "is not plain data"
        )
        raise ConfigError(f"{path}: refused: the file {what}; {_PLAIN}") from None
    except Exception as err:  # torch reports damaged archives as RuntimeError, EOFError, ...
        reason = _one_line(str(err)) or type(err).__name__
        raise ConfigError(f"{path}: truncated or not a checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{path}: not a checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


def _torch_classes(module: Any, base: type) -> frozenset[str]:
    return frozenset(
        f"{module.__name__}.{name}"
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, base)
    )


TORCH_TARGETS = _torch_classes(torch.optim, torch.optim.Optimizer) | _torch_classes(
    torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler
)


def allowed_target(target: str) -> bool:
    """Whether `target` names a torch optimizer or LR scheduler, or an nn.Module class of
    polymodal. Only `polymodal.` module paths are imported to look (polymodal's own code);
    the object itself must be a polymodal class, since a module path also reaches what
    the module imported (`polymodal.api.torch.load`), and polymodal's functions and
    non-module classes write files (data writers, checkpoint callbacks)."""
    if target in TORCH_TARGETS:
        return True
    module_name, _, name = target.rpartition(".")
    if not module_name.startswith("polymodal."):
        return False
    try:
        value = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return False
    return (
        isinstance(value, type)
        and issubclass(value, nn.Module)
        and value.__module__.startswith("polymodal.")
    )


def check_targets(cfg: Any, field: str) -> None:
    """Raise a ConfigError naming the key path of the first refused `_target_` in a plain
    dict/list config tree (nested dicts, lists and `_args_` included), before anything
    is built. `${...}` interpolations are refused too: instantiate resolves them, so one
    (`${oc.create:...}`) could produce a `_target_` this check never saw."""
    if isinstance(cfg, dict):
        if "_target_" in cfg:
            target = cfg["_target_"]
            if not (isinstance(target, str) and allowed_target(target)):
                raise ConfigError(
                    f"{field}._target_: {_one_line(repr(target))} is refused ({_ALLOWED})"
                )
        for key, value in cfg.items():
            check_targets(value, f"{field}.{key}")
    elif isinstance(cfg, list | tuple):
        for index, item in enumerate(cfg):
            check_targets(item, f"{field}[{index}]")
    elif isinstance(cfg, str) and "${" in cfg:
        raise ConfigError(f"{field}: {_one_line(repr(cfg))} is refused ({_INTERPOLATION})")


def read_weights(path: str | Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file whose keys `wanted` accepts: a `.safetensors` file
    (only the wanted tensors are read), or a torch file (a Lightning checkpoint's
    `state_dict`, or a plain state dict) unpickled as `read_checkpoint` does."""
    if str(path).endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as file:
                names = file.keys()  # noqa: SIM118 (a safe_open handle is no dict)
                return {k: file.get_tensor(k) for k in names if wanted(k)}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the weights ({err.strerror})") from None
        except Exception as err:  # safetensors reports a bad header as SafetensorError
            raise ConfigError(f"{path}: not a safetensors file ({_one_line(str(err))})") from None
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a state dict (its state_dict is a {type(state).__name__})")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(f"{path}: not a state dict (its {bad!r} is no tensor)")
    return {k: v for k, v in state.items() if wanted(k)}


def timm_filter(module: nn.Module, prefix: str) -> Callable[[dict], dict] | None:
    """The `checkpoint_filter_fn` of the timm model at `prefix` in `module`, bound to it."""
    try:
        target = module.get_submodule(prefix.removesuffix("."))
    except AttributeError:  # the prefix names no module; the key matching reports it
        return None
    if not type(target).__module__.startswith("timm."):
        return None
    fn = getattr(sys.modules[type(target).__module__], "checkpoint_filter_fn", None)
    return None if fn is None else lambda state: fn(state, target)


def init_weights(
    module: nn.Module,
    path: str | Path,
    prefix: str = "",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Copy the tensors of the weights file at `path` into `module`'s state (not a
    resume: nothing else of the file is used). A file key becomes `prefix + key` (a timm
    ViT file into `model.encoders.image.model.`); keys matching an `include` pattern and
    no `exclude` pattern (fnmatch) are loaded. A shape that differs is a ConfigError
    naming the key, and so is a file of which nothing matches. When `prefix` names a timm
    model, the file goes through that model's own `checkpoint_filter_fn` first, as timm's
    pretrained loading does: position embeddings resampled to the model's image size and
    patch grid, other checkpoint layouts (e.g. OpenAI CLIP's) converted. Returns the keys
    `loaded`, the file's `unused` ones (the module lacks them: a classifier head) and the
    selected module keys `not_in_file`."""

    def selected(key: str) -> bool:
        return any(fnmatchcase(key, p) for p in include) and not any(
            fnmatchcase(key, p) for p in exclude
        )

    tensors = read_weights(path, lambda k: selected(prefix + k))
    adapt = timm_filter(module, prefix)
    if adapt is not None:
        tensors = adapt(tensors)
    tensors = {prefix + k: v for k, v in tensors.items()}
    state = module.state_dict()
    for key, value in tensors.items():
        if key in state and value.shape != state[key].shape:
            raise ConfigError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model's is "
                f"{tuple(state[key].shape)} (init_keys.exclude it, or match the model)"
            )
    loaded = [k for k in tensors if k in state]
    if not loaded:
        raise ConfigError(
            f"{path}: no tensor matches the model (init_keys: prefix {prefix!r}, include "
            f"{list(include)}, exclude {list(exclude)}; a file key with the prefix: "
            f"{next(iter(tensors), None)!r}, a model key: {next(iter(state))!r})"
        )
    with torch.no_grad():
        for key in loaded:
            state[key].copy_(tensors[key])
    return {
        "loaded": loaded,
        "unused": [k for k in tensors if k not in state],
        "not_in_file": [
            k for k in state if k.startswith(prefix) and selected(k) and k not in tensors
        ],
    }
