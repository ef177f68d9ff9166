"""Rate-aware GPTQ against plain GPTQ's SDClip-k frontier, on the demo's trained checkpoint.

Two frontiers of (artifact bytes, quantized val_bpb), matrices int6, embedding int8 k = 20
(the ``record_small`` policy), Hessians collected once (64 calibration batches):

* plain GPTQ, the matrices' clip width k ∈ {10, 11.5, 12.85, 14.5, 16, 20};
* rate-aware GPTQ (``gptq_rate_lambda``), k = 12.85, λ ∈ {0.1, 0.3, 1, 3}.

Bytes are the real ``--codec ans`` artifact; bpb the full validation split of the demo's
corpus, paired against plain GPTQ at k = 12.85 with a bootstrap interval over documents
(:func:`qlab.analysis.frontier.rate_frontier`, the same code as the figure
``pr1394_rate_aware_gptq``). For each λ point the plain frontier is interpolated at the
same Δbpb: the row reports the largest relative saving and that point's interval.
Skipped, with a note, without ``runs/demo`` (``make bench`` runs the demo first).
"""

from __future__ import annotations

from benchmarks.demo_inputs import DEMO, demo_available, demo_inputs
from benchmarks.record import Record

KS = (10.0, 11.5, 12.85, 14.5, 16.0, 20.0)
LAMBDAS = (0.1, 0.3, 1.0, 3.0)


def run() -> list[Record]:
    if not demo_available():
        note = f"skipped: {DEMO}/runs/tiny not found (run `make demo`)"
        return [
            Record("rate-aware gptq bytes saved at equal bpb", "relative bytes", float("nan"), "", notes=note)
        ]
    from qlab.analysis.frontier import PLAIN, RATE_AWARE, bytes_saved_at_equal_bpb, rate_frontier
    from qlab.quant.policy import get_policy

    policy = get_policy("record_small")
    d = demo_inputs(policy)
    seq_len = d["config"].eval_seq_len
    df = rate_frontier(d["model"], policy, d["hessians"], d["val"], d["tables"], seq_len=seq_len, ks=KS,
                       lambdas=LAMBDAS)  # fmt: skip
    saved = bytes_saved_at_equal_bpb(df)
    best = saved.loc[saved["saving"].idxmax()] if len(saved) else None

    def fmt(method: str, key: str, sym: str) -> str:
        g = df[df["method"] == method]
        return "; ".join(
            f"{sym}={r[key]:g}: {r['artifact_bytes']:,} B, {1e3 * r['delta_bpb']:+.2f} "
            f"[{1e3 * r['ci_lo']:+.2f}, {1e3 * r['ci_hi']:+.2f}]"
            for _, r in g.iterrows()
        )

    where = "no λ point inside the plain range"
    if best is not None:
        where = (f"best at λ={best['rate_lambda']:g}, whose Δbpb 95 % CI is "
                 f"[{1e3 * best['ci_lo']:+.2f}, {1e3 * best['ci_hi']:+.2f}] mBPB")  # fmt: skip
    return [
        Record(
            name="rate-aware gptq bytes saved at equal bpb",
            metric="relative bytes",
            value=float(best["saving"]) if best is not None else float("nan"),
            unit="",
            target=">= 0.02",
            baseline="plain GPTQ's SDClip-k frontier (interpolated at equal paired Δbpb)",
            met=bool(best["saving"] >= 0.02) if best is not None else None,
            notes=(
                f"demo checkpoint, --codec ans bytes, full validation split, Δbpb paired against plain GPTQ "
                f"at k=12.85 (mBPB, bootstrap 95 % CI over documents); {where}; plain: "
                f"{fmt(PLAIN, 'k', 'k')}; rate-aware (k=12.85): {fmt(RATE_AWARE, 'rate_lambda', 'λ')}"
            ),
        ),  # fmt: skip
        _kl_row(df),
    ]


def _kl_row(df) -> Record:
    """The same frontier on the quiet signal: bytes saved at equal KL to the float model."""
    from qlab.analysis.frontier import RATE_AWARE, bytes_saved_at_equal_bpb

    saved = bytes_saved_at_equal_bpb(df, signal="kl")
    best = saved.loc[saved["saving"].idxmax()] if len(saved) else None
    rate = df[df["method"] == RATE_AWARE]
    points = "; ".join(f"λ={r['rate_lambda']:g}: ΔKL {1e3 * r['delta_kl']:+.3f} [{1e3 * r['kl_lo']:+.3f}, "
                       f"{1e3 * r['kl_hi']:+.3f}]" for _, r in rate.iterrows())  # fmt: skip
    where = "no λ point inside the plain range"
    if best is not None:
        ci = f"[{1e3 * best['kl_lo']:+.3f}, {1e3 * best['kl_hi']:+.3f}]"
        where = f"best at λ={best['rate_lambda']:g}, ΔKL 95 % CI {ci} mbit/byte"
    return Record(
        name="rate-aware gptq bytes saved at equal kl",
        metric="relative bytes",
        value=float(best["saving"]) if best is not None else float("nan"),
        unit="",
        target=">= 0.02",
        baseline="plain GPTQ's SDClip-k frontier interpolated at equal paired ΔKL (mbit/byte)",
        met=bool(best["saving"] >= 0.02) if best is not None else None,
        notes=f"{where}; rate-aware (k=12.85): {points}",
    )


if __name__ == "__main__":
    from benchmarks.record import markdown_table

    print(markdown_table(run()))
