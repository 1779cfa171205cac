"""The package's import layers, read from the source with `ast` (nothing is imported).

utils < data, models < objectives < evaluation < tasks < apps: a module imports polymodal
modules of its own package or of a lower layer only. `utils` is the leaf: it imports
nothing of polymodal but itself, so any layer can use it without a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import polymodal

PACKAGE = Path(polymodal.__file__).parent
# package (first name below polymodal) -> layer; the top-level modules are the apps
LAYERS = {
    "utils": 0,
    "data": 1,
    "models": 1,
    "objectives": 2,
    "evaluation": 3,
    "tasks": 4,
}
APPS = 5  # train.py, evaluate.py, embed.py, api.py, polymodal/__init__.py


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The polymodal modules `path` imports, anywhere in it (also inside functions)."""
    names = set()
    package = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + (path.name == "__init__.py")]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from polymodal.data import build` imports polymodal.data.build
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return {name for name in names if name == "polymodal" or name.startswith("polymodal.")}


def layer_of(module: str) -> tuple[str, int]:
    """(package, layer) of a polymodal module; the apps share one layer."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1], LAYERS[parts[1]]
    return "apps", APPS


def edges() -> list[tuple[str, str]]:
    """(importer, imported) for every polymodal import in the package's source."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        if source.startswith("polymodal.conf"):
            continue
        for target in sorted(imported(path)):
            # `from polymodal.x import name` also lists `polymodal.x.name`; keep real modules
            if target.count(".") >= 2 and not _is_module(target):
                continue
            found.append((source, target))
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative).is_dir()


def test_utils_imports_no_other_polymodal_package():
    bad = [
        f"{source} -> {target}"
        for source, target in edges()
        if source.startswith("polymodal.utils")
        and target != "polymodal.utils"
        and not target.startswith("polymodal.utils.")
    ]
    assert not bad, "utils must stay a leaf:\n" + "\n".join(bad)


def test_imports_go_down_the_layers():
    bad = []
    for source, target in edges():
        (source_package, source_layer), (target_package, target_layer) = map(
            layer_of, (source, target)
        )
        if source_package == target_package:
            continue
        if target_layer >= source_layer:
            bad.append(f"{source} ({source_package}) -> {target} ({target_package})")
    assert not bad, (
        "imports against utils < data, models < objectives < evaluation < tasks < apps:\n"
        + "\n".join(bad)
    )
