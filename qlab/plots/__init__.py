"""Figures: one function per figure, taking a tidy DataFrame and returning a Figure.

All figures share :mod:`qlab.plots.style`; the papers' figures live in
:mod:`qlab.plots.pr2011`, :mod:`qlab.plots.pr1818`, :mod:`qlab.plots.pr1394`, and
:mod:`qlab.plots.paper_figures` redraws them from the shipped paper data.
"""

from qlab.plots.style import label_axes, new_figure, save_figure, style_context, use_style

__all__ = ["label_axes", "new_figure", "save_figure", "style_context", "use_style"]
