"""Effect of the record-fidelity modes on val_bpb at CPU scale (docs/record.md).

Trains the ``tiny`` preset on the embedded corpus four ways — qlab's defaults, the
record's data order (``--loader record``), the record's bf16 precision (``--precision
record``), and both — for several seeds, and prints one markdown table: mean val_bpb,
its standard deviation over seeds, and each mode's difference from the default paired
by seed (mean ± standard error). The record loader ignores SEED, so its seeds differ only
in the initialisation.

    OMP_NUM_THREADS=2 python -m benchmarks.record_modes --seeds 0 1 --out /tmp/record_modes
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from qlab.train.config import resolve_configs
from qlab.train.trainer import train

MODES = {
    "qlab defaults": {},
    "--loader record": {"loader": "record"},
    "--precision record": {"precision": "record"},
    "both": {"loader": "record", "precision": "record"},
}


def run_mode(name: str, seed: int, out: Path) -> float:
    opts = dict(MODES[name])
    precision = opts.pop("precision", "fp32")
    run_dir = out / f"{name.strip('-').replace(' ', '_')}_seed{seed}"
    metrics = run_dir / "result.json"
    if metrics.exists():
        return float(json.loads(metrics.read_text())["val_bpb"])
    cfg, model = resolve_configs(
        "tiny", {"seed": seed, "out_dir": str(run_dir), **opts}, {"precision": precision}, env={}
    )
    result = train(cfg, model, progress=False)
    metrics.write_text(json.dumps({"val_bpb": result.val_bpb}))
    return result.val_bpb


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.record_modes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("runs/record_modes"))
    args = p.parse_args(argv)
    bpb = {name: [run_mode(name, s, args.out) for s in args.seeds] for name in MODES}
    base = bpb["qlab defaults"]
    print(f"| mode | val_bpb mean | sd over {len(args.seeds)} seeds | Δ vs defaults (mBPB, paired) |")
    print("|---|---|---|---|")
    for name, xs in bpb.items():
        m, sd = _mean_sd(xs)
        d_m, d_sd = _mean_sd([1000 * (x - b) for x, b in zip(xs, base, strict=True)])
        delta = "—" if name == "qlab defaults" else f"{d_m:+.1f} ± {d_sd / math.sqrt(len(xs)):.1f}"
        print(f"| {name} | {m:.4f} | {sd:.4f} | {delta} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
