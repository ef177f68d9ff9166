"""Every figure qlab regenerates, from the same library code the notebooks use.

* :mod:`.registry` — :data:`FIGURES`: id → paper, paper figure, plot function, notebook;
* :mod:`.workspace` — :class:`Workspace`: the cached checkpoint, data, quantized model;
* :mod:`.tables` — the measured tables behind the figures (one function per table);
* :mod:`.scale` — ``smoke`` / ``default`` / ``full`` experiment sizes;
* :func:`generate_figures` — build and save them (``qlab figures``).
"""

from qlab.figures.generate import generate_figures
from qlab.figures.registry import FIGURES, NOTEBOOKS, FigureSpec, figure_table, get_figure
from qlab.figures.scale import SCALES, Scale, get_scale
from qlab.figures.workspace import Workspace, figure_policy

__all__ = [
    "FIGURES",
    "NOTEBOOKS",
    "SCALES",
    "FigureSpec",
    "Scale",
    "Workspace",
    "figure_policy",
    "figure_table",
    "generate_figures",
    "get_figure",
    "get_scale",
]
