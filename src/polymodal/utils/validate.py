"""Type- and range-check a composed config before anything is built.

Hydra rejects unknown keys and group options itself, but happily passes
`trainer.max_steps=abc` through as a string that fails much later, and a type hint says
nothing of `data.batch_size=-4` (which would train on one batch). This walks every node:
a node with a `_target_` has its keys compared with the target's parameters (`+model.foo=1`
would fail inside the constructor) and its simple values (int, float, bool, str, Literal,
Optional, Union) with its type hints, and any value whose key is in `RANGES` must lie in
its range, so a bad value fails at start-up naming the key.
"""

from __future__ import annotations

import inspect
import types
import typing
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

from polymodal.utils.errors import ConfigError

_SIMPLE = (int, float, bool, str)


class Range(NamedTuple):
    """Bounds of a number (None: unbounded); `low_open`/`high_open` exclude the bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = (
            self.high is None or value < self.high or (value == self.high and not self.high_open)
        )
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
FRACTION = Range(0, 1)
# Keys (shell-style patterns over the dotted key) whose values have a range; each item of
# a list value is checked (crop_scale, betas). None is allowed where the type allows it.
RANGES: dict[str, Range] = {
    "data.batch_size": AT_LEAST_1,
    "data.val_batch_size": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0,
    "data.image_size": AT_LEAST_1,
    "data.context_length": Range(2),  # BOS + EOS
    "data.crop_scale": Range(0, 1, low_open=True),
    "data.shuffle_buffer": AT_LEAST_0,
    "data.train_samples": AT_LEAST_1,
    "data.max_pixels": AT_LEAST_1,
    "data.max_caption_bytes": AT_LEAST_1,
    "data.audio.sample_rate": Range(1_000, 384_000),
    "data.audio.seconds": POSITIVE,
    "data.audio.n_fft": AT_LEAST_1,
    "data.audio.hop_length": AT_LEAST_1,
    "data.audio.n_mels": AT_LEAST_1,
    "data.audio.f_min": AT_LEAST_0,
    "data.audio.max_seconds": POSITIVE,
    "task.optimizer.lr": POSITIVE,
    "task.optimizer.weight_decay": AT_LEAST_0,
    "task.optimizer.eps": POSITIVE,
    "task.optimizer.betas": Range(0, 1, high_open=True),
    "task.scheduler.warmup_steps": AT_LEAST_0,
    "task.scheduler.min_lr_ratio": FRACTION,
    "task.max_nonfinite_steps": AT_LEAST_1,
    "task.objectives.*.weight": AT_LEAST_0,
    "task.objectives.*.mask_ratio": Range(0, 1, high_open=True),  # some patches stay visible
    "task.objectives.*.mask_prob": FRACTION,
    "task.objectives.*.label_smoothing": FRACTION,
    "model.micro_batch_size": AT_LEAST_1,
    "model.towers.*.unlocked_groups": AT_LEAST_0,
    "model.logit_scale.init": POSITIVE,
    "model.logit_scale.max": POSITIVE,
    "task.evaluation.media_samples": AT_LEAST_0,
    "task.evaluation.itm_rerank_k": AT_LEAST_0,
    "task.evaluation.caption_batches": AT_LEAST_0,
    "task.evaluation.retrieval_chunk_size": AT_LEAST_1,
    # streams have no length: training runs max_steps (the schedule needs the total)
    "trainer.max_steps": AT_LEAST_1,
    "trainer.accumulate_grad_batches": AT_LEAST_1,
    "trainer.val_check_interval": POSITIVE,
    "trainer.log_every_n_steps": AT_LEAST_1,
    "trainer.gradient_clip_val": AT_LEAST_0,
    "trainer.num_nodes": AT_LEAST_1,
    "batch_size": AT_LEAST_1,  # polymodal-eval, polymodal-embed
}


def check_range(key: str, value: Any) -> None:
    """Raise `ConfigError("<key>: must be <range>, got <value>")` when `key` has a range in
    `RANGES` and `value` (or an item of it) lies outside."""
    bounds = next((r for pattern, r in RANGES.items() if fnmatchcase(key, pattern)), None)
    if bounds is None or value is None:
        return
    for item in value if isinstance(value, (list, tuple, ListConfig)) else [value]:
        if item not in bounds:
            raise ConfigError(f"{key}: must be {bounds}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # containers, callables, classes: not checked here


def _is_checkable(hint: Any) -> bool:
    """Only hints built purely from simple types are enforced."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return all(_is_checkable(a) for a in typing.get_args(hint))
    return origin is typing.Literal or hint in (*_SIMPLE, type(None))


def _import(target: str, key: str) -> Any:
    try:
        return get_object(target)
    except (ImportError, AttributeError) as err:
        reason = str(err.__cause__ or err).splitlines()[0]
        raise ConfigError(f"{key}: cannot import {target!r} ({reason})") from None


def _hints(obj: Any) -> dict[str, Any]:
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check
        return {}


def _parameters(obj: Any) -> set[str] | None:
    """The keyword parameters `obj` accepts; None when it takes any (**kwargs) or has no
    signature to read."""
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY}


def check_types(node: Any, path: str = "") -> None:
    """Raise `ConfigError("<key>: expected <type>, got <value>")` on the first mismatch of
    a type, `ConfigError("<key>: must be <range>, got <value>")` of a range, and
    `ConfigError("<key>: not a parameter of <target>")` for a key its target does not take."""
    if isinstance(node, DictConfig):
        hints: dict[str, Any] = {}
        accepted: set[str] | None = None
        if "_target_" in node:
            target = _import(node["_target_"], f"{path}._target_" if path else "_target_")
            hints, accepted = _hints(target), _parameters(target)
        for key in node:
            full_key = f"{path}.{key}" if path else str(key)
            if str(key).startswith("_"):
                continue
            if accepted is not None and key not in accepted:
                raise ConfigError(f"{full_key}: not a parameter of {node['_target_']}")
            if node._get_node(key)._is_missing():
                continue
            value = node[key]
            hint = hints.get(key)
            if hint is not None and _is_checkable(hint) and not _matches(value, hint):
                raise ConfigError(f"{full_key}: expected {_name(hint)}, got {value!r}")
            check_range(full_key, value)
            check_types(value, full_key)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_types(item, f"{path}[{i}]")


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
