"""Commands of the README and docs/*.md, extracted as a reader would type them.

A ```bash (or sh/shell) block holds shell commands: a line continued with `\\` joins the
next, comments are dropped, and each remaining line is one command. A ```python block is
one snippet. A command that cannot run in CI carries the marker `# not run in CI: <reason>`
(a bash command: in a comment at the end of its last line; a snippet: on any line).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SHELL_LANGUAGES = ("bash", "sh", "shell")
NOT_RUN = re.compile(r"not run in CI:\s*([^)]+?)\s*\)?\s*$")
# what a reader fills in by hand: the newest run directory (see substitute_placeholders)
PLACEHOLDER = re.compile(r"<(time|dir|run_dir|run|output_dir)>")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)")


@dataclass(frozen=True)
class Command:
    """One shell command (continuations joined, comments dropped) or one Python snippet."""

    doc: Path
    line: int  # 1-based line of its first line in the document
    language: str  # "bash" or "python"
    text: str
    not_run: str | None  # the reason given by a `# not run in CI:` marker

    @property
    def name(self) -> str:
        """A test id: where it is and how it starts."""
        first = self.text.splitlines()[0] if self.language == "bash" else "python snippet"
        return f"{self.doc.name}:{self.line}: {first[:70]}"


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: a `#` starts a comment at the start of a word and
    outside quotes, as bash reads it."""
    quote = ""
    escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def shell_commands(doc: Path, block: list[str], first_line: int) -> list[Command]:
    """The commands of one shell block (`block` holds its lines, the fences excluded)."""
    commands = []
    parts: list[str] = []
    start = 0
    for offset, raw in enumerate(block):
        code, comment = split_comment(raw)
        if not parts:
            start = first_line + offset
        if code.endswith("\\"):
            parts.append(code[:-1].strip())
            continue
        parts.append(code.strip())
        text = " ".join(p for p in parts if p)
        parts = []
        if text:
            marker = NOT_RUN.search(comment)
            commands.append(Command(doc, start, "bash", text, marker and marker.group(1)))
    return commands


def python_snippet(doc: Path, block: list[str], first_line: int) -> Command:
    """A ```python block as one snippet; a marker on any line applies to all of it."""
    text = "\n".join(block) + "\n"
    reasons = [m.group(1) for line in block if (m := NOT_RUN.search(split_comment(line)[1]))]
    return Command(doc, first_line, "python", text, reasons[0] if reasons else None)


def extract_commands(doc: Path) -> list[Command]:
    """Every command of `doc`'s shell and python blocks, in document order."""
    commands: list[Command] = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), len(lines))
        indent = len(fence.group(1))
        block = [line[indent:] for line in lines[i + 1 : end]]
        language = fence.group(2).lower()
        if language in SHELL_LANGUAGES:
            commands += shell_commands(doc, block, i + 2)
        elif language == "python":
            commands.append(python_snippet(doc, block, i + 2))
        i = end + 1
    return commands


def newest(paths: list[Path]) -> Path | None:
    """The most recently modified of `paths`."""
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def substitute_placeholders(text: str, cwd: Path) -> str:
    """Fill in `<time>`, `<dir>`, `<run_dir>` as a reader would: with the newest run
    directory. Inside a path (`logs/train/runs/<time>/checkpoints/last.ckpt`) it is the
    newest directory for which the whole path exists; alone, the newest run directory of
    any app under logs/."""

    def in_path(match: re.Match) -> str:
        before, after = match.group(1), match.group(3)
        if before.startswith("/"):
            return match.group(0)  # an absolute path names the reader's own directories
        found = newest(list(cwd.glob(f"{before}*{after}")))
        if found is None:
            return match.group(0)  # left as written: the command fails and says why
        return before + found.relative_to(cwd).parts[before.count("/")] + after

    text = re.sub(r"([\w./-]*/)<(time|dir|run_dir|run|output_dir)>([\w./-]*)", in_path, text)
    run = newest([p for p in cwd.glob("logs/*/runs/*") if p.is_dir()])
    if run is not None:
        text = PLACEHOLDER.sub(str(run.relative_to(cwd)), text)
    return text


def working_tree_files(repo: Path) -> list[str]:
    """What git would commit (tracked files, and new ones not ignored), relative to `repo`:
    the tree as it is being changed, without local leftovers such as data/ or logs/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (repo / name).is_file()]
