"""How many more bytes GPTQ codes take than RTN codes of the same bits and clip width.

``qlab entropy`` of a float checkpoint has no Hessians, so it predicts from RTN codes;
GPTQ's error feedback moves codes away from the centre and its artifact is larger. This
script measures the ratio (predicted brotli-11 bytes of the GPTQ tensors, GPTQ over RTN,
Hessians from 16 calibration batches of the embedded corpus) on trained checkpoints and
prints mean and standard deviation — the calibration behind
``qlab.analysis.entropy_report.GPTQ_RTN_EXCESS`` (docs/record.md).

    python -m benchmarks.gptq_excess runs/record_modes/*/
"""

from __future__ import annotations

import argparse
import math

from qlab.analysis.entropy_report import entropy_report
from qlab.eval.context import EvalContext
from qlab.quant.policy import get_policy


def excess(run: str, policy_name: str = "record_small", batches: int = 16) -> float:
    ctx = EvalContext.open(run, "embedded")
    model, policy = ctx.model, get_policy(policy_name)
    hessians = ctx.hessians(policy, batches)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    rtn = entropy_report(sd, policy).table.set_index("name")["predicted_bytes"]
    gptq = entropy_report(sd, policy, hessians=hessians).table.set_index("name")["predicted_bytes"]
    names = list(hessians)
    return float(gptq[names].sum() / rtn[names].sum() - 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gptq_excess")
    p.add_argument("runs", nargs="+")
    p.add_argument("--policy", default="record_small")
    args = p.parse_args(argv)
    xs = []
    for run in args.runs:
        xs.append(excess(run, args.policy))
        print(f"{run}: GPTQ/RTN − 1 = {100 * xs[-1]:+.3f} %")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    print(f"mean {100 * m:+.3f} %, sd {100 * sd:.3f} % over {len(xs)} checkpoints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
