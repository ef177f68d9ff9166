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
The quiet signal: ``resolve docs: bpb`` and ``resolve docs: kl`` are the validation
documents a paired comparison needs for a 95 % interval of ±1 mBPB(-equivalent) — of
Δbpb, and of the change of KL(p_float ‖ p_quant) in bits per byte — measured on one real
change (every block matrix one bit less under record_small); ``allocator gain (kl)``
is the allocator run on the table's ΔKL column instead of Δbpb, its chosen policy's
paired ΔKL against the uniform recipe at equal bytes (Δbpb in the notes).
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
    cap = int(table["base_bytes"].iloc[0])
    alloc = allocate(model, policy, table, cap, val, tables, hessians, seq_len=cfg.eval_seq_len)
    quiet = allocate(
        model, policy, table, cap, val, tables, hessians, seq_len=cfg.eval_seq_len, value="delta_kl"
    )
    return (
        _predictor_row(fit, fit_predictor(table, slopes="shared"), resolved)
        + _allocator_rows(alloc)
        + _noise_rows(model, policy, hessians, val, tables, cfg.eval_seq_len)
        + _kl_allocator_rows(quiet)
    )


def _noise_rows(model, policy, hessians, val, tables, seq_len: int) -> list[Record]:
    """Documents needed for ±1 mBPB(-equivalent) with each signal, on one real change."""
    import math

    from qlab.analysis.marginal import group_tensors, measure_policy, scoring_inputs, variant_policy
    from qlab.eval.agreement import docs_to_resolve

    ev = scoring_inputs(val, tables, seq_len, None, 1)
    base = measure_policy(model, policy, hessians, ev, "ans")
    groups = group_tensors(base.state)
    blocks = [n for g, names in groups.items() if g != "embedding" for n in names]
    fewer = variant_policy(policy, blocks, "bits-1", dict(model.state_dict()))
    other = measure_policy(model, fewer, hessians, ev, "ans")
    dbytes = ev["doc_bytes"]
    dbpb = (other.doc_nll - base.doc_nll) / math.log(2)
    dkl = other.doc_kl - base.doc_kl
    n_bpb, n_kl = docs_to_resolve(dbpb, dbytes, 1e-3), docs_to_resolve(dkl, dbytes, 1e-3)
    bpb, kl = 1e3 * dbpb.sum() / dbytes.sum(), 1e3 * dkl.sum() / dbytes.sum()
    change = (f"block matrices bits-1 under record_small: Δbpb {bpb:+.2f} mBPB, ΔKL {kl:+.3f} "
              f"mbit/byte over {dbytes.size} documents")  # fmt: skip
    return [
        Record("resolve docs: bpb", "documents for a ±1 mBPB 95 % interval", n_bpb, "docs",
               baseline="paired Δbpb", notes=change),
        Record("resolve docs: kl", "documents for a ±1 mbit/byte 95 % interval", n_kl, "docs",
               baseline="paired ΔKL to the float model",
               notes=f"{n_bpb / n_kl:.0f}× fewer documents than Δbpb; {change}"),
    ]  # fmt: skip


def _kl_allocator_rows(alloc: dict) -> list[Record]:
    if "vs_uniform" not in alloc:
        return [Record("allocator gain (kl)", "ΔKL", 0.0, "mbit/byte", notes="the table suggests no change")]
    u = alloc["vs_uniform"]
    picked = ", ".join(f"{g} {s}" for g, s in alloc["choice"].items())
    return [
        Record(
            name="allocator gain (kl)",
            metric="paired ΔKL to the float model",
            value=1e3 * u["delta_kl"],
            unit="mbit/byte",
            target="< 0 beyond its CI",
            baseline="record_small with the matrices' k solved to equal bytes",
            met=bool(u["kl_hi"] < 0),
            notes=(
                f"allocated on ΔKL: {picked}; {u['bytes']:,} B vs {u['base_bytes']:,} B; ΔKL 95 % CI "
                f"[{1e3 * u['kl_lo']:+.3f}, {1e3 * u['kl_hi']:+.3f}]; Δbpb {1e3 * u['delta_bpb']:+.2f} mBPB "
                f"[{1e3 * u['ci_lo']:+.2f}, {1e3 * u['ci_hi']:+.2f}]"
            ),
        )
    ]


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
