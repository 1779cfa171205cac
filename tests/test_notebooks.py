"""The notebooks in notebooks/: they run top to bottom on a tiny checkpoint and dataset, and
are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import train_tiny

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# cells (by id) that must show a picture when the notebook runs
PICTURE_CELLS = {
    "quickstart.ipynb": ["zero-shot", "retrieval", "captions"],
    "data.ipynb": ["grid", "counts"],
}


@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory, shapes_dir) -> Path:
    """last.ckpt of a 2-step CoCa run: contrastive + captioning, so it has a decoder."""
    return train_tiny(tmp_path_factory.mktemp("coca"), shapes_dir, "experiment=coca")[0]


@pytest.fixture
def kernel_env(monkeypatch, tmp_path, shapes_dir) -> None:
    """Environment of the kernel nbclient starts (it inherits this process's variables)."""
    monkeypatch.setenv("POLYMODAL_SHAPES_DIR", str(shapes_dir))
    monkeypatch.setenv("POLYMODAL_ROOT", str(tmp_path))  # nothing in the repo's logs/
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("POLYMODAL_CKPT", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend


def execute(path: Path) -> nbformat.NotebookNode:
    """Run every cell as Jupyter would (cwd = notebooks/); raises on the first failing cell."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    return notebook


def cell_outputs(notebook: nbformat.NotebookNode, cell_id: str) -> list:
    return next(cell for cell in notebook.cells if cell.get("id") == cell_id).outputs


def printed(outputs: list) -> str:
    return "".join(output.get("text", "") for output in outputs if output.output_type == "stream")


def pictures(outputs: list) -> int:
    return sum("image/png" in output.get("data", {}) for output in outputs)


def test_there_are_notebooks():
    assert [path.name for path in NOTEBOOKS] == sorted(PICTURE_CELLS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.id


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path, coca_checkpoint, kernel_env, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CKPT", str(coca_checkpoint))
    notebook = execute(path)
    for cell_id in PICTURE_CELLS[path.name]:
        assert pictures(cell_outputs(notebook, cell_id)) >= 1, cell_id
    if path.name == "quickstart.ipynb":
        found = printed(cell_outputs(notebook, "find-checkpoint"))
        assert f"checkpoint ($POLYMODAL_CKPT): {coca_checkpoint}" in found
        assert "caption decoder: True" in printed(cell_outputs(notebook, "load"))
        assert printed(cell_outputs(notebook, "captions")).count("generated:") == 8
    if path.name == "data.ipynb":
        assert " 128 samples" in printed(cell_outputs(notebook, "manifest"))


def test_quickstart_trains_a_tiny_checkpoint_when_there_is_none(kernel_env, tmp_path):
    notebook = execute(NOTEBOOK_DIR / "quickstart.ipynb")
    checkpoint = tmp_path / "logs" / "train" / "runs" / "quickstart-tiny" / "checkpoints"
    found = printed(cell_outputs(notebook, "find-checkpoint"))
    assert f"checkpoint (trained just now): {checkpoint / 'last.ckpt'}" in found
    assert "This checkpoint has no caption decoder" in printed(cell_outputs(notebook, "captions"))
