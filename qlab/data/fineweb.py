"""Download Parameter Golf's published FineWeb shards and tokenizer from the Hugging Face hub.

Files live in the dataset repo ``willdepueoai/parameter-golf`` under ``datasets/``:
``datasets/datasets/fineweb10B_sp{V}/fineweb_{train,val}_%06d.bin`` and
``datasets/tokenizers/fineweb_{V}_bpe.model``. They are mirrored locally in Parameter
Golf's layout so ``open_dataset(out_dir)`` reads them. The download function is a
parameter (``fetch``) so tests use a local fake hub and never the network.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from qlab.data.dataset import DatasetInfo, open_dataset
from qlab.data.shards import read_shard_header
from qlab.data.tokenizer import load_tokenizer
from qlab.errors import ConfigError, DataError
from qlab.io.atomic import atomic_write

VARIANTS = {"sp1024": 1024, "sp8192": 8192}
DEFAULT_REPO = "willdepueoai/parameter-golf"
# The sp8192 shards are not in the default repository's manifest; PR #1394's README
# downloads them from this one (with MATCHED_FINEWEB_REPO_ID, which qlab honours too).
VARIANT_REPOS = {"sp1024": DEFAULT_REPO, "sp8192": "kevclark/parameter-golf"}
REPO_ENV = "MATCHED_FINEWEB_REPO_ID"


def default_repo(variant: str, env: Mapping[str, str] | None = None) -> str:
    """$MATCHED_FINEWEB_REPO_ID if set, else the repository known to hold ``variant``."""
    env = os.environ if env is None else env
    _vocab(variant)
    return env.get(REPO_ENV) or VARIANT_REPOS[variant]


Fetch = Callable[[str], "str | os.PathLike"]


def remote_files(variant: str, train_shards: int, val_shards: int = 1, prefix: str = "datasets") -> list[str]:
    """Repository paths of the tokenizer, the val shards and the first train shards."""
    v = _vocab(variant)
    base = f"{prefix}/" if prefix else ""
    data = f"{base}datasets/fineweb10B_sp{v}"
    files = [f"{base}tokenizers/fineweb_{v}_bpe.model"]
    files += [f"{data}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    files += [f"{data}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return files


def download_fineweb(
    variant: str,
    train_shards: int,
    out_dir: str | os.PathLike,
    repo_id: str | None = None,
    prefix: str = "datasets",
    val_shards: int = 1,
    fetch: Fetch | None = None,
) -> DatasetInfo:
    """Fetch the tokenizer, ``val_shards`` val and ``train_shards`` train shards into ``out_dir``.

    ``fetch(repo_path) -> local_path`` defaults to ``huggingface_hub.hf_hub_download``.
    Files already present and valid are kept; each new shard's header is validated.
    """
    if train_shards < 0 or val_shards < 1:
        raise ConfigError(f"need train_shards ≥ 0 and val_shards ≥ 1, got {train_shards} / {val_shards}")
    out = Path(out_dir)
    staging = out / ".hub"
    repo_id = repo_id or default_repo(variant)
    fetch = fetch or _hub_fetch(repo_id, staging)
    manifest = Path(fetch(f"{prefix}/manifest.json" if prefix else "manifest.json"))
    _check_manifest(manifest, variant, train_shards, val_shards, repo_id)
    for remote in remote_files(variant, train_shards, val_shards, prefix):
        local = out / (remote[len(prefix) + 1 :] if prefix else remote)
        if local.is_file() and _valid(local):
            continue
        _install(Path(fetch(remote)), local, remote)
    shutil.rmtree(staging, ignore_errors=True)
    return open_dataset(out, vocab_size=_vocab(variant))


def _check_manifest(path: Path, variant: str, train_shards: int, val_shards: int, repo_id: str) -> None:
    """The repository's manifest.json must list the variant with enough shards."""
    if not path.is_file():
        raise DataError(f"{repo_id}: manifest.json: download produced no file (expected {path})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{repo_id}: manifest.json unreadable ({type(exc).__name__})") from None
    name = f"fineweb10B_sp{_vocab(variant)}"
    entries = manifest.get("datasets", []) if isinstance(manifest, dict) else []
    entry = next((e for e in entries if isinstance(e, dict) and e.get("name") == name), None)
    if entry is None:
        hint = VARIANT_REPOS["sp8192"]
        raise DataError(f"{repo_id}: manifest.json lists no dataset {name} (for sp8192 try --repo {hint})")
    stats = entry.get("stats")
    stats = stats if isinstance(stats, dict) else {}
    for key, want in (("files_train", train_shards), ("files_val", val_shards)):
        have = stats.get(key)
        if isinstance(have, int) and want > have:
            raise DataError(f"{repo_id}: {name} has {have} {key[6:]} shards, {want} were requested")


def _vocab(variant: str) -> int:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown FineWeb variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _valid(path: Path) -> bool:
    try:
        if path.suffix == ".bin":
            read_shard_header(path)
        else:
            load_tokenizer(path)
    except DataError:
        return False
    return True


def _install(src: Path, dst: Path, remote: str) -> None:
    """Copy a fetched file into place atomically after validating it."""
    if not src.is_file():
        raise DataError(f"{remote}: download produced no file (expected {src})")
    try:
        if dst.suffix == ".bin":
            read_shard_header(src)
        else:
            load_tokenizer(src)
    except DataError as exc:
        raise DataError(f"downloaded {remote} is invalid: {exc}") from exc

    def copy(f) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 22)

    atomic_write(dst, copy)


def _hub_fetch(repo_id: str, staging: Path) -> Fetch:
    try:
        from huggingface_hub import hf_hub_download  # the optional `hub` extra
    except ImportError as exc:
        raise DataError(
            "downloading FineWeb needs the optional package huggingface_hub "
            "(pip install 'qlab[hub]' or pip install huggingface_hub)"
        ) from exc

    def fetch(remote: str) -> str:
        return hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset", local_dir=staging)

    return fetch
