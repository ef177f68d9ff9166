"""When to draw progress bars: one rule for the library, the CLI and notebooks.

Bars help where someone watches (a Jupyter kernel, where ``tqdm.auto`` draws an
ipywidgets bar, or a terminal) and only clutter logs and CI output elsewhere.
"""

from __future__ import annotations

import sys


def interactive() -> bool:
    """True inside a Jupyter kernel or when stderr is a terminal."""
    ipython = sys.modules.get("IPython")  # never imported here: only a running kernel has it
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def resolve_progress(progress: bool | None) -> bool:
    """``progress`` as given, or :func:`interactive` when it is None (the default)."""
    return interactive() if progress is None else bool(progress)


def cli_progress(disabled: bool) -> bool:
    """A command's bars: off when its ``--no-progress``/``--quiet`` flag is set, else :func:`interactive`."""
    return False if disabled else interactive()
