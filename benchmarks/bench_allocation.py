"""The marginal table of the demo's checkpoint and the Δbpb predictor fitted on it.

``qlab marginal`` on ``runs/demo`` (record_small policy; groups by family; bits ± 1 and
k × 0.8 / × 1.25; bytes of the ``ans`` artifact; paired bootstrap over documents), then
the second-order predictor Δbpb ≈ a_s·Δtr(ΔW H ΔWᵀ) + b (one slope for the tied embedding,
one for the block matrices): the row ``predictor R^2`` is its leave-one-out R² (each row
predicted by a fit on the others), the notes give the in-sample R², the noise ceiling, the
one-slope fit and how many effects were resolved.
Then the allocator for the base's own artifact size: ``allocator gain mBPB`` is the
chosen policy's paired Δbpb against the uniform recipe (matrices' k solved to the same
bytes), negative = better, with its bootstrap interval in the notes.
Skipped, with a note, without ``runs/demo`` (``make bench`` runs the demo first).
"""

from __future__ import annotations

from benchmarks.demo_inputs import DEMO, demo_available, demo_inputs
from benchmarks.record import Record


def run() -> list[Record]:
    if not demo_available():
        return [
            Record("predictor R^2", "R^2", float("nan"), "", notes=f"skipped: {DEMO}/runs/tiny not found")
        ]
    from qlab.analysis.allocator import allocate
    from qlab.analysis.marginal import fit_predictor, marginal_table
    from qlab.quant.policy import get_policy

    policy = get_policy("record_small")
    d = demo_inputs(policy)
    model, cfg, hessians, val, tables = d["model"], d["config"], d["hessians"], d["val"], d["tables"]
    table = marginal_table(model, policy, val, tables, hessians, seq_len=cfg.eval_seq_len)
    fit = fit_predictor(table)
    resolved = int(table["resolved"].sum())
    alloc = allocate(model, policy, table, int(table["base_bytes"].iloc[0]), val, tables, hessians,
                     seq_len=cfg.eval_seq_len)  # fmt: skip
    return _predictor_row(fit, fit_predictor(table, slopes="shared"), resolved) + _allocator_rows(alloc)


def _allocator_rows(alloc: dict) -> list[Record]:
    if "vs_uniform" not in alloc:
        return [Record("allocator gain mBPB", "mBPB", 0.0, "mBPB", notes="the table suggests no change")]
    u = alloc["vs_uniform"]
    picked = ", ".join(f"{g} {s}" for g, s in alloc["choice"].items())
    resolved = u["ci_lo"] > 0 or u["ci_hi"] < 0
    return [
        Record(
            name="allocator gain mBPB",
            metric="paired Δ val_bpb",
            value=1e3 * u["delta_bpb"],
            unit="mBPB",
            target="< 0 beyond its CI",
            baseline="record_small with the matrices' k solved to equal bytes",
            met=bool(u["ci_hi"] < 0),
            notes=(
                f"{picked}; {u['bytes']:,} B vs {u['base_bytes']:,} B (k = {alloc['uniform_k']:.3f}); "
                f"95 % CI [{1e3 * u['ci_lo']:+.2f}, {1e3 * u['ci_hi']:+.2f}] mBPB "
                f"({'resolved' if resolved else 'not resolved'})"
            ),
        )  # fmt: skip
    ]


def _predictor_row(fit: dict, shared: dict, resolved: int) -> list[Record]:
    return [
        Record(
            name="predictor R^2",
            metric="R^2 (leave-one-out)",
            value=fit["loo_r2"],
            unit="",
            target=">= 0.9",
            baseline="measured paired Δbpb of the demo's marginal table",
            met=bool(fit["loo_r2"] >= 0.9),
            notes=(
                f"{fit['n']} rows (groups embedding/attention/mlp × bits±1, k×0.8/1.25), {resolved} "
                f"resolved at 95 %; in-sample R² {fit['r2']:.3f}; noise ceiling (an exact "
                f"predictor's expected R² given the rows' CIs) {fit['r2_ceiling']:.3f}; "
                "slopes (bpb per unit of Δtr(ΔW H ΔWᵀ)) "
                + ", ".join(f"{k} {a:.3g}" for k, a in fit["slopes"].items())
                + f"; one shared slope instead: R² {shared['r2']:.3f}, leave-one-out {shared['loo_r2']:.3f}"
            ),
        )  # fmt: skip
    ]


if __name__ == "__main__":
    from benchmarks.record import markdown_table

    print(markdown_table(run()))
