"""Peak memory and throughput of streaming a multi-GB checkpoint with ``iter_tensors``.

A synthetic safetensors file of ``QLAB_BENCH_GB`` GB (default 4; many 2-D fp32 and
bf16 tensors) is written piece by piece, so writing needs one tensor's worth of RAM,
then read in a fresh subprocess that computes each tensor's std (a stand-in for
analysis) and reports its peak RSS (``VmHWM``) and throughput. The same is measured
for ``check_finite=False`` (the NaN/Inf scan costs about as much as the read), for
``safetensors.safe_open`` (memory-mapped) as the baseline, and for a torch ``.pt``
file of ``QLAB_BENCH_TORCH_GB`` GB (default 1; 0 skips it), which ``iter_tensors``
memory-maps and hands pages back from. Target: peak RSS < 1 GB for the 4 GB file.
The file sits in the page cache after writing, so throughput is a warm-cache figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.record import Record

ROOT = Path(__file__).resolve().parents[1]
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def synthetic_layout(total_bytes: int, rows: int = 2048, cols: int = 4096) -> list[tuple[str, torch.dtype]]:
    """Names and dtypes of 2-D ``rows x cols`` tensors, alternating fp32/bf16, adding to ~total_bytes."""
    out, size, i = [], 0, 0
    while size < total_bytes:
        dt = torch.float32 if i % 2 == 0 else torch.bfloat16
        out.append((f"blocks.{i // 2}.{'fc' if i % 2 == 0 else 'proj'}.weight", dt))
        size += rows * cols * dt.itemsize
        i += 1
    return out


def write_synthetic_safetensors(
    path: str | os.PathLike, total_bytes: int, rows: int = 2048, cols: int = 4096, seed: int = 0
) -> int:
    """Write a valid safetensors file one tensor at a time; returns its size in bytes.

    Layout: u64 little-endian header length, JSON header (padded with spaces to a
    multiple of 8 so data stays aligned), then each tensor's raw little-endian bytes.
    """
    layout = synthetic_layout(total_bytes, rows, cols)
    header, offset = {}, 0
    for name, dt in layout:
        n = rows * cols * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": [rows, cols], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, dt in layout:
            t = (torch.randn(rows, cols, generator=gen) * 0.02).to(dt)
            f.write(t.view(torch.uint8).numpy().tobytes())
    return 8 + len(raw) + offset


# Runs in a fresh interpreter so its peak RSS is the reader's alone.
_CHILD = r"""
import json, sys, time
mode, path = sys.argv[1], sys.argv[2]
import torch
from qlab.loaders.readers import iter_tensors

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def tensors():
    if mode == "safe_open":
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        yield from iter_tensors(path, check_finite=(mode != "qlab-nocheck"))

base = hwm()
t0 = time.perf_counter()
nbytes, acc, n = 0, 0.0, 0
for name, t in tensors():
    nbytes += t.numel() * t.element_size()
    acc += float(t.float().std())
    n += 1
    del t
dt = time.perf_counter() - t0
print(json.dumps({"peak": hwm(), "base": base, "bytes": nbytes, "seconds": dt, "tensors": n, "acc": acc}))
"""


def measure(mode: str, path: Path) -> dict:
    """Iterate ``path`` in a subprocess; returns peak/baseline RSS, bytes read and seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_synthetic_torch(path: Path, total_bytes: int, rows: int = 2048, cols: int = 4096) -> None:
    """A torch.save state dict of ~total_bytes (built in RAM in a subprocess, so ours stays small)."""
    code = (
        "import sys, torch\n"
        "from benchmarks.bench_reader_memory import synthetic_layout\n"
        "r, c = int(sys.argv[3]), int(sys.argv[4])\n"
        "g = torch.Generator().manual_seed(1)\n"
        "sd = {n: (torch.randn(r, c, generator=g) * 0.02).to(dt) "
        "for n, dt in synthetic_layout(int(sys.argv[2]), r, c)}\n"
        "torch.save(sd, sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", code, str(path), str(total_bytes), str(rows), str(cols)]
    subprocess.run(args, check=True, env=env)


def _records(label: str, m: dict, target_mb: float | None, baseline: str) -> list[Record]:
    gb = m["bytes"] / 1e9
    peak_mb = m["peak"] / 2**20
    return [
        Record(
            name=f"reader_memory/{label}",
            metric="peak RSS",
            value=peak_mb,
            unit="MiB",
            target="" if target_mb is None else f"< {target_mb:.0f} for a {gb:.1f} GB file",
            baseline=baseline,
            met=None if target_mb is None else peak_mb < target_mb,
            notes=f"{m['tensors']} tensors, {gb:.2f} GB; interpreter+torch alone {m['base'] / 2**20:.0f} MiB",
        ),
        Record(
            name=f"reader_memory/{label}",
            metric="throughput",
            value=gb / m["seconds"],
            unit="GB/s",
            notes="warm page cache; includes a std() per tensor",
        ),
    ]


def run() -> list[Record]:
    gb = float(os.environ.get("QLAB_BENCH_GB", "4"))
    torch_gb = float(os.environ.get("QLAB_BENCH_TORCH_GB", "1"))
    tmp = Path(tempfile.mkdtemp(prefix="qlab_bench_reader_"))
    records: list[Record] = []
    try:
        st = tmp / "synthetic.safetensors"
        write_synthetic_safetensors(st, int(gb * 1e9))
        records += _records(f"iter_tensors safetensors {gb:g} GB", measure("qlab", st), 1024, "")
        nocheck = measure("qlab-nocheck", st)
        records += _records(f"iter_tensors check_finite=False {gb:g} GB", nocheck, 1024, "")
        records += _records(f"safe_open (mmap) {gb:g} GB", measure("safe_open", st), None, "baseline")
        st.unlink()
        if torch_gb > 0:
            pt = tmp / "synthetic.pt"
            write_synthetic_torch(pt, int(torch_gb * 1e9))
            records += _records(f"iter_tensors torch .pt {torch_gb:g} GB", measure("qlab", pt), 1024, "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records


if __name__ == "__main__":
    from benchmarks.record import markdown_table

    print(markdown_table(run()))
