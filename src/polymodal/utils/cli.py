"""What the four command-line apps share: one-line user errors, progress bars, the logs.

A user error (a bad value, file or config key) ends an app with one line on stderr,
`error: <key or file>: <what is wrong>`, and exit code 1; anything else is a bug and keeps
its traceback. `POLYMODAL_DEBUG=1` (or Hydra's `HYDRA_FULL_ERROR=1`) shows every
traceback. The Hydra apps raise their errors from two places: the task function (our
code, run inside Hydra's job runner, which would print `Error executing job...` and a
trimmed traceback) and Hydra itself (composing the config: an unknown group option or
key, an override that does not parse, which Hydra prints over several lines). `hydra_app`
catches both: around the task, and around Hydra with `HYDRA_FULL_ERROR=1` so that Hydra
raises instead of printing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from polymodal.utils import resolvers
from polymodal.utils.errors import ConfigError, SkippedSample
from polymodal.utils.resolvers import SWEPT_KEYS

# the configs ship inside the package (a wheel installs them beside the code)
CONFIG_DIR = str(importlib.resources.files("polymodal") / "conf")
# "1" shows full tracebacks; the apps write "0" or "1" into the environment, so the
# processes they start (DDP ranks, SLURM jobs) decide the same way
DEBUG = "POLYMODAL_DEBUG"
# the libraries whose log records go through the app's handlers (console and log file)
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
T = TypeVar("T")


def debug() -> bool:
    """Whether the user asked for tracebacks: POLYMODAL_DEBUG=1, or HYDRA_FULL_ERROR=1."""
    if DEBUG in os.environ:
        return os.environ[DEBUG] == "1"
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_error(err: BaseException) -> str | None:
    """The one line that reports `err` when the user can fix it (a bad config value, key
    or file), None when it is a bug. Hydra and OmegaConf messages span several lines
    (option lists, `full_key: ...`); the line keeps what names the key."""
    if isinstance(err, InstantiationException):
        # Hydra wraps what a `_target_` raised: the cause decides; without one, or when
        # the target cannot be imported, Hydra's own message names the key
        cause = err.__cause__
        if cause is None or isinstance(cause, ImportError):
            return one_line(str(err))
        line = user_error(cause)
        key = _full_key(str(err))
        return f"{key}: {line}" if line and key and not line.startswith(key) else line
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        if isinstance(err, MissingMandatoryValue) and key:
            return f"{key}: required, not set (e.g. {key}=...)"
        line = one_line(str(err))
        return f"{key}: {line}" if key and not line.startswith(key) else line
    if isinstance(err, HydraException):
        line = one_line(str(err))
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException):
            line += f"; {one_line(str(cause))}"
        return line
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or one_line(str(err))}"
    if isinstance(err, (ConfigError, SkippedSample)):  # a bad value or file, named
        return one_line(str(err))
    return None


def one_line(message: str) -> str:
    """A multi-line message as one line: Hydra's `Available options` lists joined with
    commas, OmegaConf's `full_key`/`object_type` lines and Hydra's search path dropped,
    and of an error re-raised from a DataLoader worker the first and last lines only."""
    lines = message.split("Config search path:")[0].splitlines()
    if any("Traceback (most recent call last)" in line for line in lines):
        lines = [lines[0], lines[-1]]
    parts: list[str] = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith(("full_key:", "object_type=")):
            continue
        if parts and line.startswith("\t"):  # an item of the list the line above opened
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + text
        else:
            parts.append(text)
    return "; ".join(part.removesuffix(".") for part in parts)


def _full_key(message: str) -> str | None:
    keys = [line.split(":", 1)[1].strip() for line in message.splitlines() if "full_key:" in line]
    return keys[0] if keys else None


def report(err: BaseException) -> bool:
    """Print `error: <line>` for a user error (not in debug mode); False: the caller
    re-raises (a bug, or debug mode)."""
    line = None if debug() else user_error(err)
    if line is None:
        return False
    print(f"error: {line}", file=sys.stderr)
    return True


def _exits_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if report(err) and not _sweep_job():
                sys.exit(1)
            raise  # a bug; or one point of a sweep, which the sweeper marks failed

    return run


def _sweep_job() -> bool:
    """Whether this is one job of a multirun: its error must reach the sweeper (Optuna
    counts a failed trial and goes on), not end the whole sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def route_library_logs() -> None:
    """Send Lightning's log records and Python warnings through the handlers Hydra's job
    logging installed (console and `<output_dir>/<app>.log`): Lightning, imported before
    Hydra configures logging, gave its loggers a stderr handler of their own and stopped
    them from propagating, so none of its records reached the log file."""
    if not logging.getLogger().handlers:  # job_logging: none (polymodal-embed)
        return
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    logging.captureWarnings(True)


def hydra_app(config_name: str) -> Callable[[Callable[[DictConfig], T]], Callable[[], T]]:
    """`@hydra.main` on the packaged config `config_name`, reporting user errors in one line
    (module docstring) and sending library logs to the run's log file. Every app goes
    through it (polymodal-data, argparse, through `report`), and with it registers the
    config's `polymodal.*` resolvers (utils/resolvers.py)."""

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[], T]:
        resolvers.register()
        guarded_task = _exits_on_user_error(task)

        @functools.wraps(task)
        def run_task(cfg: DictConfig) -> T:
            route_library_logs()
            return guarded_task(cfg)

        hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
        run_hydra = _exits_on_user_error(hydra_main(run_task))

        @functools.wraps(task)
        def main() -> T:
            os.environ[DEBUG] = "1" if debug() else "0"
            if {"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(sys.argv[1:]):
                os.environ[SWEPT_KEYS] = ",".join(swept_keys(sys.argv[1:]))
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to run_hydra
            return run_hydra()

        return main

    return decorate


def swept_keys(args: list[str]) -> list[str]:
    """The keys of the sweep overrides among command-line `args` (`lr=1e-3,3e-3`,
    `range(...)`, `choice(...)`); an override that does not parse is Hydra's to report."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return []
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def interactive() -> bool:
    """Whether progress bars are shown: stderr is a terminal, not a pipe or a log file."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; the context yields `advance(n)`. Shown only when stderr is
    a terminal: piped or logged output (SLURM, CI) gets no control characters."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not interactive(),
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
