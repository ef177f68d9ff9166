"""Third-party trained checkpoints for the benchmarks, fetched by ``make third-party``.

Weights trained by someone else, with their own code and data, so the codec and
entropy numbers are not only about checkpoints qlab's trainer made. Each file is pinned
to a commit and a SHA-256; nothing here runs in CI or in ``make test``, and nothing is
committed (``data/third_party/`` is ignored). Both are small character-level GPTs
saved by ``torch.save`` — the only trained language models found committed whole (not
as Git LFS pointers) in public repositories when this list was made; qlab reads them
with ``torch.load(weights_only=True)``.

    python -m benchmarks.third_party            # download into data/third_party/
    python -m benchmarks bench_codecs           # then the codec table has their rows
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DIR = Path("data/third_party")


@dataclass(frozen=True)
class Checkpoint:
    name: str
    repo: str
    commit: str
    path: str
    sha256: str
    size: int
    what: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"

    @property
    def local(self) -> Path:
        return DIR / f"{self.name}.pt"


CATALOGUE = (
    Checkpoint(
        name="slm4096",
        repo="kunalkohli/SLM_4096",
        commit="975a1dd4bb00ba0c3551bcdad655b7c7e8d71c34",
        path="ckpt.pt",
        sha256="95c66b8c8bffa05c0d7992d29add046d400eef3add4bc1eecd7a0b6abb3e3601",
        size=1126529,
        what="nanoGPT-style GPT, 4 layers × 64 wide, 54-character vocabulary, trained on 4 KB of text",
    ),
    Checkpoint(
        name="natotato",
        repo="NatoTatoSHC/ai",
        commit="ca987203ca942f15e4944466af30f1cd7ff022a2",
        path="ckpt.pt",
        sha256="a004792a8c4e254b6abedacee64a8781c01364ef7f004e8ec1fffc5158eeda5b",
        size=583665,
        what="nn.TransformerEncoder character LM, 32 wide with 2048-wide MLPs, 82-character vocabulary",
    ),
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def present() -> list[Checkpoint]:
    """The catalogue's checkpoints already downloaded (and intact)."""
    return [c for c in CATALOGUE if c.local.is_file() and sha256(c.local) == c.sha256]


def download(c: Checkpoint) -> Path:
    """Fetch one checkpoint; refuse (and delete) a file whose SHA-256 is not the pinned one."""
    DIR.mkdir(parents=True, exist_ok=True)
    part = c.local.with_suffix(".part")
    with urllib.request.urlopen(c.url, timeout=60) as r, part.open("wb") as f:  # noqa: S310 (pinned https URL)
        f.write(r.read(c.size + 1))
    got = sha256(part)
    if got != c.sha256:
        part.unlink()
        raise SystemExit(f"{c.url}: SHA-256 {got} is not the pinned {c.sha256}; nothing kept")
    part.replace(c.local)
    return c.local


def main() -> int:
    for c in CATALOGUE:
        if c in present():
            print(f"{c.local}: already here")
            continue
        print(f"{c.url} -> {download(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
