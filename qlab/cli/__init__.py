"""The ``qlab`` command. Thin: parse arguments, call the library, print.

Each command group lives in its own module in this package, named as the command, and
exposes ``register(subparsers)`` and a one-line ``HELP`` string; modules are discovered
automatically so command groups can be added without touching this file. Only the
command being run is imported (its module pulls in torch, pandas, …): the others are
listed with their ``HELP``, read from the module's source, so ``qlab --help`` and a
mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import ast
import errno
import importlib
import os
import pkgutil
import sys
import traceback
import warnings
from pathlib import Path

from qlab._version import __version__
from qlab.errors import QlabError


def commands() -> list[str]:
    """The command names: the modules of this package (none imported)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def command_help(name: str) -> str:
    """A command's ``HELP`` string, read from its module's source without importing it."""
    tree = ast.parse(Path(__file__).with_name(f"{name}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets):
            return ast.literal_eval(node.value)
    return ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that command is fully registered (the rest listed)."""
    parser = argparse.ArgumentParser(
        prog="qlab", description="Quantization and compression workbench for small language models."
    )
    parser.add_argument("--version", action="version", version=f"qlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in commands():
        if only is None or name == only:
            importlib.import_module(f"{__name__}.{name}").register(sub)
        else:
            sub.add_parser(name, help=command_help(name))
    return parser


def _command_of(argv: list[str]) -> str:
    """The command named in ``argv`` ("" when none: then only the listing is needed)."""
    first = next((a for a in argv if not a.startswith("-")), "")
    return first if first in commands() else ""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one plain line (no source path): they are meant for the user."""
    print(f"qlab: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=_command_of(argv)).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QlabError as exc:
        print(f"qlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qlab … | head`: the reader left; no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        print("qlab: error: out of memory (the input asks for more than this machine has)", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            return _internal_error(exc)
        print(f"qlab: error: {environment_message(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not _is_allocation_failure(exc):
            return _internal_error(exc)
        print(f"qlab: error: out of memory ({str(exc).splitlines()[0]}); use a smaller input, "
              "fewer tokens or batches, or a machine with more memory", file=sys.stderr)  # fmt: skip
        return 2
    except Exception as exc:
        return _internal_error(exc)


# The user's environment, not a bug: exit 2 with what to do (the write that failed left the
# previous file in place: every write qlab makes is atomic).
_REMEDY = {
    errno.ENOSPC: "no space left on the device: free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or write to another disk",
    errno.EROFS: "read-only file system: choose a writable output path",
    errno.EACCES: "permission denied: choose a path you may write to (or fix its permissions)",
    errno.EPERM: "operation not permitted: choose a path you may write to",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}
_ENVIRONMENT_ERRNOS = frozenset(_REMEDY)


def environment_message(exc: OSError) -> str:
    """``PATH: what happened and what to do`` for an OSError caused by the environment."""
    where = exc.filename if exc.filename is not None else "a file"
    return f"{where}: {_REMEDY.get(exc.errno or 0, exc.strerror)}"


def _is_allocation_failure(exc: RuntimeError) -> bool:
    # torch reports a failed allocation as a RuntimeError (CUDA: torch.OutOfMemoryError)
    text = str(exc)
    return isinstance(exc, _torch_oom()) or "can't allocate memory" in text or "not enough memory" in text


def _torch_oom() -> type[BaseException]:
    """torch.OutOfMemoryError when torch is loaded (the CLI does not import torch for --help)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", MemoryError) if torch is not None else MemoryError


def _internal_error(exc: BaseException) -> int:
    """A bug, not a bad input: say so, and keep the traceback."""
    traceback.print_exception(exc)
    print(f"qlab: internal error ({type(exc).__name__}: {exc}); please report it", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
