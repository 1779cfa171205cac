"""Type-check a composed config against the signatures of its `_target_`s.

Hydra rejects unknown keys and group options itself, but happily passes
`trainer.max_steps=abc` through as a string that fails much later. This walks every node
with a `_target_` and compares simple values (int, float, bool, str, Literal, Optional,
Union) with the target's type hints, so a wrong type fails at start-up naming the key.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

from polymodal.utils.errors import ConfigError

_SIMPLE = (int, float, bool, str)


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


def _hints(target: str) -> dict[str, Any]:
    obj = get_object(target)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check
        return {}


def check_types(node: Any, path: str = "") -> None:
    """Raise `ConfigError("<key>: expected <type>, got <value>")` on the first mismatch."""
    if isinstance(node, DictConfig):
        hints = _hints(node["_target_"]) if "_target_" in node else {}
        for key in node:
            full_key = f"{path}.{key}" if path else str(key)
            if str(key).startswith("_") or node._get_node(key)._is_missing():
                continue
            value = node[key]
            hint = hints.get(key)
            if hint is not None and _is_checkable(hint) and not _matches(value, hint):
                raise ConfigError(f"{full_key}: expected {_name(hint)}, got {value!r}")
            check_types(value, full_key)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_types(item, f"{path}[{i}]")


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
