"""Every notebook runs top to bottom, headless, at smoke scale, and shows its figures.

The parameter cell (tag ``parameters``) is replaced before execution; the measured
tables come from the session's smoke cache (shared with ``tests/test_figures.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

from qlab.figures import NOTEBOOKS
from qlab.figures.notebooks import notebook_path, parameter_source, run_notebook

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


def _draws(source: str) -> bool:
    """A cell whose last line draws a figure (a plot function or a registered figure)."""
    last = [ln for ln in source.splitlines() if ln.strip()][-1:]
    return bool(last) and any(k in last[0] for k in ("plot_", "matrix_figures(", 'FIGURES["'))


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_at_smoke_scale(name, kernel_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("executed") / f"{name}.ipynb"
    before = (REPO / NOTEBOOKS[name]).read_bytes()
    run_notebook(name, out, scale="smoke", work_dir=smoke_work_dir(tmp_path_factory), timeout=600)
    assert (REPO / NOTEBOOKS[name]).read_bytes() == before  # the source is never touched
    nb = nbformat.read(out, as_version=4)
    images = sum(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )
    shown = sum(_draws(c.source) for c in nb.cells if c.cell_type == "code")
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


def test_notebook_lookup_and_parameters(tmp_path):
    from qlab.errors import ConfigError

    assert notebook_path("pr1394") == notebook_path("01_pr1394_sdclip") == REPO / NOTEBOOKS["pr1394"]
    with pytest.raises(ConfigError, match="no notebook 'nope'"):
        notebook_path("nope")
    with pytest.raises(ConfigError, match="overwrite the source"):
        run_notebook("pr1394", REPO / NOTEBOOKS["pr1394"])
    src = parameter_source(checkpoint=tmp_path / "run", scale="default")
    ns: dict = {}
    exec(src, ns)  # the cell is valid Python holding exactly the four parameters
    assert ns["checkpoint"] == str(tmp_path / "run") and ns["data"] is None and ns["scale"] == "default"
