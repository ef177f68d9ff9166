"""Every notebook runs top to bottom, headless, at smoke scale, and shows its figures.

The parameter cell (tag ``parameters``) is replaced before execution; the measured
tables come from the session's smoke cache (shared with ``tests/test_figures.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from qlab.figures import NOTEBOOKS

pytestmark = pytest.mark.slow  # builds the smoke workspace (~45 s once per session)

REPO = Path(__file__).resolve().parent.parent


def smoke_work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "qlab_figures_smoke"  # same as test_figures


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """Use the ``python3`` kernel; when no such spec is installed, one for this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import write_kernel_spec

        root = tmp_path_factory.mktemp("jupyter")
        write_kernel_spec(
            str(root / "kernels" / "python3"),
            overrides={"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]},
        )
        monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _parameterize(nb: nbformat.NotebookNode, work: Path) -> None:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    cells[0].source = f'checkpoint = None\ndata = None\nscale = "smoke"\nwork_dir = {str(work)!r}\n'


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_at_smoke_scale(name, kernel_env, tmp_path_factory):
    path = REPO / NOTEBOOKS[name]
    nb = nbformat.read(path, as_version=4)
    _parameterize(nb, smoke_work_dir(tmp_path_factory))
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    images = sum(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )
    shown = sum('FIGURES["' in c.source for c in nb.cells if c.cell_type == "code")
    assert images >= shown > 0, (name, images, shown)
    warned = [
        (i, out.get("text", "")[:200])
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for out in c.outputs
        if out.get("output_type") == "stream"
        and out.get("name") == "stderr"
        and "Warning" in out.get("text", "")
    ]
    assert not warned, (name, warned)  # a notebook a researcher keeps open prints no warnings
