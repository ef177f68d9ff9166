"""The embedded default corpus: English prose that ships with Python itself.

pydoc's topic help plus the docstrings of a fixed, sorted list of standard-library
modules, ~1.6 MB. The text is extracted in a fresh interpreter (``python -I -S`` running
this file) because third-party libraries monkeypatch the stdlib (torch replaces
``inspect.getfile``), which would otherwise make the corpus depend on what the caller
imported. Everything is sorted, so the corpus is identical across runs of one Python
version. This module imports only the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import re
import subprocess
import sys

# Plain, side-effect-free stdlib modules with substantial English docstrings. Excludes
# antigravity, this, tkinter/turtle, idlelib, test.* and platform-only modules.
_MODULE_NAMES = """
        abc argparse ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd
        code codecs codeop collections collections.abc colorsys compileall concurrent.futures
        configparser contextlib contextvars copy copyreg csv dataclasses datetime decimal
        difflib dis doctest email email.message email.policy email.utils enum errno filecmp
        fileinput fnmatch fractions ftplib functools gc getopt gettext glob graphlib gzip
        hashlib heapq hmac html html.parser http http.client http.cookiejar http.cookies
        http.server imaplib importlib importlib.abc importlib.metadata importlib.resources
        inspect io ipaddress itertools json json.decoder json.encoder keyword linecache
        locale logging logging.config logging.handlers lzma mailbox marshal math mimetypes
        modulefinder netrc numbers operator optparse os os.path pathlib pdb pickle
        pickletools pkgutil platform plistlib poplib pprint profile pstats py_compile
        pyclbr pydoc queue quopri random re reprlib rlcompleter runpy sched secrets
        selectors shelve shlex shutil signal site smtplib socket socketserver sqlite3
        ssl stat statistics string stringprep struct subprocess symtable sys sysconfig
        tabnanny tarfile tempfile textwrap threading time timeit token tokenize tomllib
        trace traceback tracemalloc types typing unicodedata unittest unittest.mock
        urllib.error urllib.parse urllib.request urllib.robotparser uuid warnings wave
        weakref wsgiref.handlers wsgiref.simple_server wsgiref.util xml.dom.minidom
        xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils
        xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib zoneinfo array mmap select
        ctypes multiprocessing multiprocessing.managers multiprocessing.pool multiprocessing.queues
        multiprocessing.shared_memory faulthandler atexit encodings ntpath posixpath genericpath
        email.headerregistry email.mime.multipart email.mime.text email.parser email.generator
        email.header email.charset email.contentmanager email.feedparser email.iterators
        xml.parsers.expat xml.etree.ElementInclude urllib.response dbm dbm.dumb cProfile venv
        asyncio.base_events asyncio.streams asyncio.subprocess asyncio.tasks asyncio.locks
        concurrent.futures.thread concurrent.futures.process importlib.util importlib.machinery
        unittest.case unittest.loader unittest.result unittest.runner unittest.suite
        """
STDLIB_MODULES: tuple[str, ...] = tuple(sorted(_MODULE_NAMES.split()))
VAL_PERMILLE = 50  # ~5% of documents go to validation, chosen by a hash of the title
_MIN_DOC_CHARS = 200


def clean_text(text: str) -> str:
    """Normalise line ends and tabs, drop control characters, collapse runs of blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"(?<=\S) {5,}", "    ", text)  # table padding, not indentation
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def is_validation(title: str) -> bool:
    """Stable train/validation assignment: sha256 of the title, ~5% validation."""
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "little")
    return h % 1000 < VAL_PERMILLE


@functools.lru_cache(maxsize=1)
def _cached_documents() -> tuple[tuple[str, str], ...]:
    cmd = [sys.executable, "-I", "-S", "-X", "utf8", __file__]
    try:
        proc = subprocess.run(cmd, capture_output=True, check=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        from qlab.errors import DataError  # imported late: this file also runs without qlab

        detail = getattr(exc, "stderr", b"") or b""
        raise DataError(f"extracting the embedded corpus failed: {exc} {detail.decode()[-2000:]}") from exc
    return tuple((title, text) for title, text in json.loads(proc.stdout.decode("utf-8")))


def embedded_titled_documents() -> list[tuple[str, str]]:
    """All (title, text) documents of the embedded corpus, sorted by title."""
    return list(_cached_documents())


def _extract_documents() -> list[tuple[str, str]]:
    """Collect the corpus in *this* interpreter (run in a clean subprocess)."""
    docs: dict[str, str] = {}
    from pydoc_data.topics import topics  # only in the clean subprocess that extracts the corpus

    for name in sorted(topics):
        docs[f"topic:{name}"] = topics[name]
    seen_docs: set[str] = set()
    for modname in STDLIB_MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue  # optional build components (sqlite3, ssl, …) may be absent
        for title, text in _module_documents(modname, module, seen_docs):
            docs.setdefault(title, text)
    out = []
    for title in sorted(docs):
        text = clean_text(docs[title])
        if len(text) >= _MIN_DOC_CHARS:
            out.append((title, text))
    return out


def embedded_documents() -> tuple[list[str], list[str]]:
    """The embedded corpus split into (train_docs, val_docs), deterministically."""
    train: list[str] = []
    val: list[str] = []
    for title, text in embedded_titled_documents():
        (val if is_validation(title) else train).append(text)
    return train, val


def corpus_fingerprint() -> str:
    """sha256 of the embedded corpus; changes whenever the Python docs change."""
    h = hashlib.sha256()
    for title, text in embedded_titled_documents():
        h.update(title.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def _own_doc(obj: object) -> str | None:
    # obj.__doc__, not inspect.getdoc: getdoc inherits parents' docs, duplicating text.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _public_members(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    base = module.__name__.split(".")[-1]
    owners = {module.__name__, f"_{base}", f"_{module.__name__}"}
    members: list[tuple[str, object]] = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and (
            getattr(obj, "__module__", None) in owners or "__all__" in vars(module)
        ):
            members.append((name, obj))
    return members


def _module_documents(modname: str, module, seen: set[str]):
    """One document for the module (its docstring and its functions), one per class."""
    parts = [p for p in [_own_doc(module)] if p]
    for name, obj in _public_members(module):
        if inspect.isclass(obj):
            text = _class_document(f"{modname}.{name}", obj, seen)
            if text:
                yield f"class:{modname}.{name}", text
            continue
        doc = _own_doc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            parts.append(f"{modname}.{name}\n\n{doc}")
    if parts:
        yield f"module:{modname}", "\n\n".join(parts)


def _class_document(qualname: str, cls: type, seen: set[str]) -> str | None:
    parts = []
    doc = _own_doc(cls)
    if doc and doc not in seen:
        seen.add(doc)
        parts.append(f"{qualname}\n\n{doc}")
    for name in sorted(vars(cls)):
        if name.startswith("_"):
            continue
        attr = vars(cls)[name]
        doc = _own_doc(attr) if inspect.isroutine(attr) or isinstance(attr, property) else None
        if doc and doc not in seen:
            seen.add(doc)
            parts.append(f"{qualname}.{name}\n\n{doc}")
    return "\n\n".join(parts) if parts else None


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_extract_documents()))
