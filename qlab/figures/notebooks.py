"""Run a notebook headless with other parameters, as papermill would, on nbclient.

Every notebook has one cell tagged ``parameters`` (``checkpoint``, ``data``, ``scale``,
``work_dir``); :func:`run_notebook` replaces it, executes every cell in a fresh kernel
and writes the executed notebook (outputs and figures included) to a new file. The
source notebook is never modified. ``qlab figures --notebook NAME`` is the CLI.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from qlab.errors import ConfigError, DataError, NotebookError
from qlab.figures.registry import NOTEBOOKS
from qlab.io.atomic import atomic_write_text

__all__ = ["parameter_source", "run_notebook", "notebook_path"]

REPO = Path(__file__).resolve().parents[2]


def notebook_path(name: str | os.PathLike) -> Path:
    """A notebook by key (``pr1394``), by file stem (``01_pr1394_sdclip``) or by path."""
    for key, rel in NOTEBOOKS.items():
        if str(name) in (key, Path(rel).stem):
            return REPO / rel
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path
    known = ", ".join(f"{k} ({Path(v).stem})" for k, v in NOTEBOOKS.items())
    raise ConfigError(f"no notebook {str(name)!r}; known: {known}, or a path to an .ipynb file")


def parameter_source(
    checkpoint: Any = None, data: Any = None, scale: str = "smoke", work_dir: Any = None
) -> str:
    """The text of a ``parameters`` cell holding these values."""
    values = {"checkpoint": checkpoint, "data": data, "scale": scale, "work_dir": work_dir}
    return "\n".join(f"{k} = {None if v is None else str(v)!r}" for k, v in values.items()) + "\n"


def run_notebook(
    name: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    scale: str = "smoke",
    work_dir: str | os.PathLike | None = None,
    timeout: int = 1800,
    kernel_name: str = "python3",
) -> Path:
    """Execute notebook ``name`` with these parameters and write the result to ``out``.

    Cells run with the repository as working directory, so relative paths are resolved
    against the caller's working directory first. An error in a cell raises a
    :class:`NotebookError` naming the cell and the error (one line, no colour codes);
    the notebook executed so far, traceback included, is written to ``out`` either way.
    """
    import nbformat  # the notebooks extra: not needed by the rest of qlab
    from nbclient import NotebookClient  # the notebooks extra, as nbformat
    from nbclient.exceptions import CellExecutionError  # the notebooks extra, as nbformat

    src = notebook_path(name)
    out_path = Path(out)
    if out_path.resolve() == src.resolve():
        raise ConfigError(f"{out_path}: would overwrite the source notebook; write the run elsewhere")
    nb = nbformat.read(src, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise DataError(f"{src}: needs exactly one cell tagged 'parameters', found {len(cells)}")
    cells[0].source = parameter_source(_as_path(checkpoint, "checkpoint"), _dataset(data), scale,
                                       None if work_dir is None else Path(work_dir).resolve())  # fmt: skip
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": str(REPO)}}
    )
    try:
        client.execute()
    except CellExecutionError as exc:
        atomic_write_text(out_path, nbformat.writes(nb))
        cell = next((i for i, c in enumerate(nb.cells) if _failed(c)), None)
        raise NotebookError(
            f"{src.name}: cell {cell} failed: {exc.ename}: {_plain(exc.evalue)} "
            f"(the notebook run so far, with its traceback, is in {out_path})"
        ) from None
    atomic_write_text(out_path, nbformat.writes(nb))
    return out_path


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _plain(text: Any) -> str:
    """One line of an error message, colour codes removed."""
    lines = _ANSI.sub("", str(text)).strip().splitlines()
    return lines[-1] if lines else ""


def _failed(cell: Any) -> bool:
    return any(o.get("output_type") == "error" for o in cell.get("outputs", []))


def _as_path(value: str | os.PathLike | None, what: str) -> Path | None:
    """A path given on the command line, resolved against the caller's working directory."""
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"{value}: {what} not found")
    return path


def _dataset(value: str | os.PathLike | None) -> str | Path | None:
    if value is None or str(value) in ("embedded", "none"):
        return None if value is None else str(value)
    return _as_path(value, "dataset")
