"""The ``qlab`` command. Thin: parse arguments, call the library, print.

Each command group lives in its own module in this package and exposes
``register(subparsers)``; modules are discovered automatically so command groups can
be added without touching this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from qlab.errors import QlabError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlab", description="Quantization and compression workbench for small language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QlabError as exc:
        print(f"qlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlab: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("qlab: error: out of memory (the input asks for more than this machine has)", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not a bad input: say so, and keep the traceback
        import traceback

        traceback.print_exc()
        print(f"qlab: internal error ({type(exc).__name__}: {exc}); please report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
