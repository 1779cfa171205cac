"""Final metrics: written to <output_dir>/metrics.json and printed as a table."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table

from polymodal.utils.files import atomic_write_text

# the apps' job logging sends this logger's records to the run's log file only (the
# console has the table): conf/hydra/default.yaml
log = logging.getLogger(__name__)


def write_metrics(
    metrics: Mapping[str, float], output_dir: str | Path, name: str = "metrics.json"
) -> Path:
    """Write `<output_dir>/<name>` atomically: a kill mid-write leaves the previous file
    whole, never a truncated one that a sweeper or script then fails to parse."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    return path


def print_metrics(
    metrics: Mapping[str, float], output_dir: str | Path, title: str = "final validation metrics"
) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"output dir: {output_dir}")
    log.info("%s: %s", title, json.dumps(dict(sorted(metrics.items()))))
