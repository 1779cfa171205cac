"""Command-line overrides of specs that are replaced whole rather than merged.

Hydra merges a dict given on the command line into the dict a preset holds, and refuses
new keys below it without `+`. For `data.zeroshot` both are wrong: `data.zeroshot={...}`
means these attributes and no others, and `data.zeroshot.label.classes=values` means
"add or set the attribute label". So `data.zeroshot=V` becomes `data.zeroshot=null
data.zeroshot=V` (a dict set over null replaces it), and `data.zeroshot.<...>=V` becomes
`++data.zeroshot.<...>=V` (set, or add when absent).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

REPLACED = ("data.zeroshot",)
T = TypeVar("T")


def replacing(args: Sequence[str]) -> list[str]:
    """`args` with the overrides of `REPLACED` specs rewritten as described above."""
    out = []
    for arg in args:
        key, equals, value = arg.partition("=")
        if not equals or key.startswith(("+", "~", "-")):
            out.append(arg)
        elif key in REPLACED:
            out += [f"{key}=null", arg]
        elif key.startswith(tuple(f"{spec}." for spec in REPLACED)):
            out.append(f"++{arg}")
        else:
            out.append(arg)
    return out


def replaces_specs(app: Callable[[], T]) -> Callable[[], T]:
    """A Hydra app (`@hydra.main` function) whose command line goes through `replacing`."""

    @functools.wraps(app)
    def run() -> T:
        sys.argv[1:] = replacing(sys.argv[1:])
        return app()

    return run
