"""Peak memory and throughput of ``qlab entropy`` (:func:`entropy_report`) on a multi-GB checkpoint.

A synthetic safetensors file of ``QLAB_BENCH_GB`` GB (default 4) is written piece by
piece with :func:`benchmarks.bench_reader_memory.write_synthetic_safetensors` (2048 × 4096
tensors, alternating fp32 and bf16), then reported under the record policy in a fresh
subprocess, which prints its peak RSS (``VmHWM``) at the end. Without ``--measure``: the
report streams one tensor at a time, while ``measure=True`` must hold every tensor's
codes (≈ 1 byte per parameter) to compress the whole stream for real, so it is not
what this benchmark measures. Target: peak RSS < 1 GB for the 4 GB file. The file sits
in the page cache after writing, so throughput is a warm-cache figure. The file is
deleted afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_reader_memory import write_synthetic_safetensors
from benchmarks.record import Record
from qlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TARGET_MIB = 1024

# Runs in a fresh interpreter so its peak RSS is the report's alone.
_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from qlab.analysis.entropy_report import entropy_report

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
t0 = time.perf_counter()
report = entropy_report(sys.argv[1], "record")
dt = time.perf_counter() - t0
t = report.totals
print(json.dumps({"peak": hwm(), "base": base, "seconds": dt, "tensors": t["tensors"], "numel": t["numel"],
                  "raw_bytes": t["raw_bytes"], "predicted_bytes": t["predicted_bytes"]}))
"""


def measure(path: Path) -> dict:
    """Run the entropy report on ``path`` in a subprocess; its peak RSS, seconds and totals."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"entropy report subprocess failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_disk(folder: Path, nbytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes + (1 << 30):
        raise ConfigError(
            f"bench_entropy_memory: {folder} has {free / 1e9:.1f} GB free, the synthetic file needs "
            f"{nbytes / 1e9:.1f} GB + 1 GB spare (set QLAB_BENCH_GB lower)"
        )


def _records(m: dict, file_bytes: int) -> list[Record]:
    gb = file_bytes / 1e9
    peak = m["peak"] / 2**20
    name = f"entropy_memory/record policy {gb:.1f} GB safetensors"
    notes = (
        f"{m['tensors']} tensors, {m['numel'] / 1e9:.2f} G params, predicted {m['predicted_bytes']:,} B; "
        f"interpreter+torch+qlab alone {m['base'] / 2**20:.0f} MiB"
    )
    return [
        Record(
            name,
            "peak RSS",
            peak,
            "MiB",
            f"< {TARGET_MIB} for a {gb:.1f} GB file",
            "",
            peak < TARGET_MIB,
            notes,
        ),
        Record(name, "throughput", gb / m["seconds"], "GB/s", notes=f"{m['seconds']:.1f} s, warm page cache"),
        Record(name, "throughput", m["numel"] / m["seconds"] / 1e6, "M params/s", notes="one thread"),
    ]


def run() -> list[Record]:
    gb = float(os.environ.get("QLAB_BENCH_GB", "4"))
    tmp = Path(tempfile.mkdtemp(prefix="qlab_bench_entropy_"))
    try:
        _check_disk(tmp, int(gb * 1e9))
        path = tmp / "synthetic.safetensors"
        size = write_synthetic_safetensors(path, int(gb * 1e9))
        return _records(measure(path), size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from benchmarks.record import markdown_table

    print(markdown_table(run()))
