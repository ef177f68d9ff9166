"""Build the notebooks in this folder from the cell lists below (outputs stripped).

    python notebooks/build_notebooks.py

Every notebook starts with a parameter cell (tag ``parameters``: checkpoint, data, scale,
work_dir) and a setup cell that opens a :class:`qlab.figures.Workspace`; the rest calls
library functions only — the measured tables of :mod:`qlab.figures.tables`, the plot
functions of :mod:`qlab.plots`, each figure drawn by the code its registry entry runs
(:meth:`qlab.figures.registry.FigureSpec.code`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = """\
checkpoint = None  # a qlab run directory; None = train the tiny preset on the embedded corpus
data = None  # a dataset directory or "embedded"; None = the checkpoint's own dataset
scale = "default"  # "smoke" (seconds), "default" (minutes on a CPU) or "full"
work_dir = None  # cache of measured tables; None = data/cache/figures"""

SETUP = """\
%matplotlib inline
import torch
from IPython.display import display

from qlab.figures import Workspace
from qlab.figures import tables as T

torch.set_num_threads(1)  # small models: one thread is fastest on a shared CPU
ws = Workspace(checkpoint, scale, data=data, work_dir=work_dir)
ws"""


def fig(figure_id: str, show_table: bool = False) -> str:
    """The figure drawn with its table and plot calls spelled out (see FigureSpec.code)."""
    from qlab.figures import FIGURES

    return FIGURES[figure_id].code(show_table)


PR_URL = "https://github.com/openai/parameter-golf/pull/{n}"

# The conclusions of the "what each bit costs" section, computed from the tables at the
# notebook's scale (so the prose never states a number the run did not measure).
PREDICTOR_FITS = """\
from qlab.analysis.marginal import fit_predictor

for slopes in ("shared", "hessian"):
    f = fit_predictor(T.byte_allocation(ws), slopes=slopes)
    print(f"{slopes:>8} slopes: R² {f['r2']:.3f}, leave-one-out {f['loo_r2']:.3f}, "
          f"noise ceiling {f['r2_ceiling']:.3f}")"""

ALLOCATOR_VERDICT = """\
alloc = T.allocation(ws)
if alloc.empty:
    print("the marginal table suggests no change: the base policy stays")
for _, r in alloc.iterrows():
    d, lo, hi = 1e3 * r.delta_bpb, 1e3 * r.ci_lo, 1e3 * r.ci_hi
    verdict = ("better than" if hi < 0 else "worse than") if r.resolved else "not distinguishable from"
    print(f"{r.comparison}: {d:+.2f} mBPB [{lo:+.2f}, {hi:+.2f}] at {r.bytes:,} vs {r.other_bytes:,} B"
          f" -> at this scale the allocated policy is {verdict} it")"""

RATE_VERDICT = """\
from qlab.analysis.frontier import bytes_saved_at_equal_bpb

saved = bytes_saved_at_equal_bpb(T.rate_aware_frontier(ws))
display(saved)
if len(saved):
    best = saved.loc[saved.saving.idxmax()]
    resolved = not best.ci_lo <= 0 <= best.ci_hi
    print(f"best: {100 * best.saving:+.2f} % bytes at λ = {best.rate_lambda:g}; its Δbpb against plain "
          f"GPTQ at k = 12.85 "
          f"[{1e3 * best.ci_lo:+.2f}, {1e3 * best.ci_hi:+.2f}] mBPB "
          + ("excludes 0" if resolved else "includes 0: not resolved"))"""
QUIET_VERDICT = """\
# The same comparisons on the quiet signal: each policy's KL divergence from the float
# model, paired per document (bits per byte, bpb's own units; qlab.eval.agreement)
for _, r in T.allocation(ws).iterrows():
    d, lo, hi = 1e3 * r.delta_kl, 1e3 * r.kl_lo, 1e3 * r.kl_hi
    verdict = ("closer to" if hi < 0 else "further from") if r.kl_resolved else "not distinguishable in"
    print(f"{r.comparison}: ΔKL {d:+.3f} mbit/byte [{lo:+.3f}, {hi:+.3f}] -> the allocated policy is "
          f"{verdict} the float model's predictions" + ("" if r.kl_resolved == r.resolved else
          f" (Δbpb {'resolved' if r.resolved else 'not resolved'})"))
saved = bytes_saved_at_equal_bpb(T.rate_aware_frontier(ws), signal="kl")
if len(saved):
    best = saved.loc[saved.saving.idxmax()]
    resolved = not best.kl_lo <= 0 <= best.kl_hi
    print(f"rate-aware GPTQ at equal KL: {100 * best.saving:+.2f} % bytes at λ = {best.rate_lambda:g}; its ΔKL "
          f"[{1e3 * best.kl_lo:+.3f}, {1e3 * best.kl_hi:+.3f}] mbit/byte "
          + ("excludes 0" if resolved else "includes 0: not resolved"))"""
SCALE_NOTE = (
    "**Why this checkpoint may differ from the PR.** The default checkpoint is the `tiny` preset "
    "(723,984 parameters, 4 layers of width 128) trained for minutes on the embedded corpus; the PRs "
    "measured 36M-parameter models trained for 10 minutes on 8×H100 on FineWeb. Effects that depend "
    "on scale, data or training length can shrink, vanish or change sign here, and differences "
    "smaller than the spread over seeds (or the band drawn in a figure) are noise. Run with "
    '`scale = "full"` and a record checkpoint to compare like with like.'
)

# name: (PR number, what to read in the figures against the PR's claim)
READING = {
    "01_pr1394_sdclip": (
        1394,
        (
            "**Reading it against the PR.** The entropy-vs-k figure should put the measured points on the "
            "Gaussian line H ≈ b − log₂k + ½log₂(πe/2) wherever the rows are near-Gaussian; points below "
            "the line mean heavier tails than Gaussian. The b/k-equivalence table tests (b, k) ≈ (b+1, 2k): "
            "its `entropy_gap` column is the cost of the extra bit. The PR's std-vs-ratio R² of 0.995 came "
            "from the record's matrices; a small model has fewer matrices over a narrower std range, so "
            "expect a lower, noisier R². Where SDClip and quantile search differ in bytes at equal error, "
            "SDClip's fixed k is what makes the artifact size predictable."
        ),
    ),
    "02_pr639_gptq_ttt": (
        639,
        (
            "**Reading it against the PR.** The PR's claim is that full GPTQ halves the quantization gap "
            "of a clip search (0.008 → 0.004 bpb) and that AdamW TTT damages GPTQ-calibrated weights "
            "(+0.076 bpb) "
            "where SGD TTT does not. Compare the ratio of the GPTQ and clip-search gaps here with ½, and "
            "the sign of the AdamW-minus-SGD final bpb with the PR's; a tiny model's gaps are smaller in "
            "absolute terms, so read the ratio and the sign, not the magnitude."
        ),
    ),
    "03_pr1818_damage_gap": (
        1818,
        (
            "**Reading it against the PR.** PR #1818's +2.36 bpb damage gap came from its own stack "
            "(freeze-dry, 2:4 packing, a curriculum) on top of int6 GPTQ; the record stack here has no "
            "such damage, so expect a quantization gap of a few mBPB, not bits. The TTT recovery curve "
            "shows how much of the gap score-first TTT wins back chunk by chunk; a spike that also "
            "appears without TTT is the data, not TTT."
        ),
    ),
    "04_pr1718_eval_levers": (
        1718,
        (
            "**Reading it against the PR.** PR #1718 found most eval-time levers inside the noise "
            "(TTT epochs 4: −0.00009) and a longer eval window helping pre-quant but hurting sliding "
            "(+0.00555). Read the levers here the same way: a difference smaller than the seed-to-seed "
            "spread is no finding. Path A's claim is bytes at no bpb cost (16.06 → 15.99 MB): check the "
            "bytes column moves and the bpb column does not."
        ),
    ),
    "05_pr2011_cross_base_regularizers": (
        2011,
        (
            "**Reading it against the PR.** The headline is that regularizer effects do not transfer: QAHSP "
            "−1.55 mBPB on base A but +2.25 on base B. The small matrix here asks the same question on two "
            "CPU-sized bases; a sign that flips between bases, or an effect inside its paired interval, "
            "supports the PR's caution rather than any one regularizer. The spectra, CKA and hidden-state "
            "figures describe this checkpoint; the paper's own figures above are its published numbers."
        ),
    ),
}


def _imports_first(code: str) -> str:
    """The cell's import lines first (deduplicated, in order), then the rest."""
    lines = code.split("\n")
    imports = list(dict.fromkeys(ln for ln in lines if ln.startswith(("from ", "import "))))
    rest = [ln for ln in lines if ln not in imports]
    while rest and not rest[0].strip():
        rest.pop(0)
    rest = [ln for i, ln in enumerate(rest) if ln.strip() or (i and rest[i - 1].strip())]
    return "\n".join(imports + ([""] if imports else []) + rest)


def _cells(name: str, title: str, intro: str, body: list[tuple[str, str]]) -> list:
    header = f"# {title}\n\n{intro}"
    if name in READING:
        n = READING[name][0]
        header += f"\n\nSource: [openai/parameter-golf PR #{n}]({PR_URL.format(n=n)})."
    cells = [
        new_markdown_cell(header),
        new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
    ]
    for kind, text in body:
        cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(_imports_first(text)))
    if name in READING:
        cells.append(new_markdown_cell(f"## What to conclude\n\n{READING[name][1]}\n\n{SCALE_NOTE}"))
    return cells


NOTEBOOKS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "00_quickstart": (
        "qlab quickstart",
        "Load a checkpoint, read its entropy report, run one rate–distortion sweep and one fingerprint. "
        "With `checkpoint = None` the `tiny` preset is trained on the embedded corpus first (cached).",
        [
            ("md", "## The checkpoint\nThe model, its configuration and its training curve."),
            ("code", "model = ws.model\nprint(ws.run_dir)\nprint(model.config)"),
            ("code", "display(T.train_curve(ws).tail())\n" + fig("pr1394_train_curve_qlab")),
            (
                "md",
                "## Entropy report\nPredicted compressed bytes of every tensor under the figures' policy "
                "(the record's int6 GPTQ / int8 embedding recipe applied to every matrix).",
            ),
            (
                "code",
                "from qlab.analysis.entropy_report import entropy_report\n\n"
                "report = entropy_report(ws.state_dict, ws.policy, hessians=ws.hessians)\n"
                "display(report.table.head(12))\nreport.totals",
            ),
            (
                "md",
                "## One rate–distortion sweep\nSDClip over k and quantile search for each bit width; "
                "every setting quantizes the whole model and is evaluated.",
            ),
            (
                "code",
                "from qlab.analysis.rd import summarize_sweep\n\n"
                "display(summarize_sweep(T.rd_sweep(ws)).head(10))\n" + fig("pr1394_entropy_vs_k"),
            ),
            ("md", "## One fingerprint\nSingular-value spectra of the weights next to their GPTQ copy."),
            ("code", 'display(T.fingerprint(ws, "family_summary"))\n' + fig("pr2011_svd_spectrum")),
            (
                "md",
                "## The same on any checkpoint, in one call each\n`qlab.entropy(path)`, "
                "`qlab.analyze(path)` (per-matrix spectra), `qlab.quantize(path, policy=…, out=…)` and "
                "`qlab.sweep(path)` take any checkpoint qlab reads — Parameter Golf, GPT-2, BERT or Llama "
                "names — and return plain tables.",
            ),
            ("code", "import qlab\n\nqlab.analyze(ws.state_dict).head()"),
            (
                "md",
                "## Quantize, evaluate, count the bytes — what `qlab quantize` does\n"
                "`quantize_checkpoint` calibrates GPTQ on training batches, writes nothing until asked "
                "(`result.save(path)`), and returns the pipeline row (pre-quant → quantized → sliding "
                "window bpb, the real artifact bytes) and the per-tensor byte table.",
            ),
            (
                "code",
                "result = qlab.quantize_checkpoint(ws.run_dir, ws.policy, ws.dataset, calib_batches=2,\n"
                "                                  max_eval_tokens=ws.eval_tokens)\n"
                'display(result.row[["pre_quant_bpb", "quantized_bpb", "sliding_bpb", "artifact_bytes"]])\n'
                "result.budget.head(8)",
            ),
        ],
    ),
    "01_pr1394_sdclip": (
        "PR #1394: SDClip and the int-b vs k trade-off",
        "The record clips each row at k·σ (SDClip) instead of searching clips. Theory: "
        "H(q) ≈ b − log₂k + ½log₂(πe/2), so (b, k) and (b+1, 2k) cost about the same; the std "
        "of a matrix predicts its compressed size at a fixed clip (R² = 0.995 in the PR).",
        [
            (
                "md",
                "## The quantization example\nA real matrix, then its int5 (±2k σ), int4 (±k σ) and "
                "NF4 code histograms (the PR's `quantization_example.png`).",
            ),
            ("code", fig("pr1394_quantization_example")),
            ("md", "## H(q) vs b and k, measured against theory"),
            (
                "code",
                "from qlab.analysis.rd import summarize_sweep\n\n"
                "sweep = T.rd_sweep(ws)\ndisplay(summarize_sweep(sweep).head())\n"
                + fig("pr1394_entropy_vs_k"),
            ),
            ("md", "## Std vs compression ratio"),
            ("code", fig("pr1394_std_vs_ratio", show_table=True)),
            ("md", "## SDClip vs quantile search (GPTQ-lite's clip search)"),
            (
                "code",
                "from qlab.analysis.rd import compare_from_sweep\n\n"
                "display(compare_from_sweep(sweep))\n" + fig("pr1394_sdclip_vs_quantile"),
            ),
            ("md", "## Rate–distortion against the Gaussian bound"),
            ("code", fig("pr1394_rd_curves")),
            (
                "md",
                "## Where the next byte goes\nThe question the records answer by hand: one change to one "
                "tensor family at a time (one bit more or less, k × 0.8 or × 1.25), Δbytes of the real "
                "artifact against the paired Δbpb on the same tokens, with a bootstrap 95 % interval over "
                "documents. A hollow point's interval contains 0: it is not a finding. `qlab marginal` "
                "computes the same table for any run and `--cap` chooses settings from it.",
            ),
            ("code", fig("pr1394_byte_allocation", show_table=True)),
            (
                "md",
                "### Predicting Δbpb without evaluating\nEvaluating every variant is what makes the table "
                "slow on a large model. The second-order estimate Δtr(ΔW H ΔWᵀ) — the quantization error "
                "weighted by the calibration Hessian, summed over the group — is computed without a "
                "forward pass; one linear fit on the measured rows turns it into Δbpb. The figure plots "
                "what was measured (with its interval) against what the fit predicts: read the R² "
                "together with the intervals — rows whose own interval spans most of the spread cannot "
                "be predicted better than their noise allows.",
            ),
            ("code", fig("pr1394_marginal_predictor")),
            ("code", PREDICTOR_FITS),
            (
                "md",
                "### Spending the same bytes better\nThe allocator picks at most one setting per group so "
                "that the predicted Σ Δbpb is smallest within the base's own artifact size, then measures "
                "the chosen policy for real: paired against the base policy, and against the uniform "
                "recipe with the matrices' k solved to the chosen policy's bytes. A point whose interval "
                "crosses 0 says that at this scale the allocation is not distinguishable from the uniform "
                "recipe — that is a result, not a failure.",
            ),
            ("code", fig("pr1394_allocator", show_table=True)),
            ("code", ALLOCATOR_VERDICT),
            (
                "md",
                "### Rate-aware GPTQ\nGPTQ rounds each weight to minimise the Hessian-weighted error alone; "
                "with a rate weight λ it also pays −log₂ p(q) bits under the tensor's code distribution. "
                "Plain GPTQ's clip width k traces one bytes-vs-bpb frontier, λ at k = 12.85 another; both "
                "are paired against plain GPTQ at 12.85 on the same tokens. A rate-aware point below and "
                "left of the plain curve saves bytes at equal bpb; the note gives the saving interpolated "
                "on the plain curve.",
            ),
            ("code", fig("pr1394_rate_aware_gptq", show_table=True)),
            ("code", RATE_VERDICT),
            (
                "md",
                "### The quiet signal\nΔbpb compares two models through the text, so each document's own "
                "difficulty enters its noise. The KL divergence from the float model's next-token "
                "distribution compares the predictions directly (bits per byte, bpb's units): the same "
                "allocations and rate-aware points, judged on it.",
            ),
            ("code", QUIET_VERDICT),
            ("md", "## The PR's own numbers\nPer-seed stages and training curves from its logs."),
            ("code", fig("paper_pr1394_seed_stages")),
            ("code", fig("paper_pr1394_train_curves")),
        ],
    ),
    "02_pr639_gptq_ttt": (
        "PR #639: full GPTQ and score-first TTT",
        "PR #639: full GPTQ halves the quantization gap of clip search (0.008 → 0.004 bpb); "
        "AdamW TTT destroys GPTQ-calibrated weights (+0.076 bpb) while SGD TTT preserves them. "
        "The PR published tables only: its numbers are drawn beside ours.",
        [
            ("md", "## Quantization gap: RTN vs clip search vs full GPTQ (every matrix int6)"),
            ("code", fig("pr639_quant_gap", show_table=True)),
            ("md", "## SGD vs AdamW score-first TTT on the GPTQ model"),
            (
                "code",
                'runs = T.ttt_optimizers(ws)\ndisplay(runs.groupby("optimizer")["final_bpb"].first())\n'
                + fig("pr639_ttt_optimizers"),
            ),
        ],
    ),
    "03_pr1818_damage_gap": (
        "PR #1818: post-quantization damage and its mechanisms",
        'PR #1818 measured a +2.36 bpb "damage gap" after quantization that TTT only partly '
        "recovered, with freeze-dry, 2:4 packing and an entropy-bucket curriculum in the stack.",
        [
            (
                "md",
                "## Damage gap by stage\nThis checkpoint (pre-quant → quantized → score-first TTT), then the "
                "PR's three seeds.",
            ),
            ("code", "display(T.damage_gap(ws))\n" + fig("pr1818_damage_gap")),
            ("code", fig("paper_pr1818_damage_gap")),
            ("code", fig("paper_pr1818_per_seed_bars")),
            ("md", "## TTT recovery curve"),
            ("code", fig("pr1818_ttt_recovery")),
            ("md", "## Freeze-dry residuals, 2:4 bit budget, curriculum schedule"),
            ("code", "display(T.freezedry(ws).iloc[:1])\n" + fig("pr1818_freezedry_histogram")),
            ("code", fig("pr1818_sparsity_24", show_table=True)),
            ("code", fig("pr1818_curriculum_schedule")),
        ],
    ),
    "04_pr1718_eval_levers": (
        "PR #1718: eval-time levers",
        "Evaluation length and stride, Path A passthrough quantization, and TTT epochs. "
        "PR #1718 published a lever table; its numbers are drawn beside ours.",
        [
            ("md", "## Evaluation length and stride"),
            ("code", "display(T.eval_levers(ws))\n" + fig("pr1718_eval_length")),
            ("md", "## Passthrough (Path A): small tensors int8 instead of fp16"),
            ("code", "display(T.passthrough(ws))\n" + fig("pr1718_passthrough")),
            ("md", "## TTT epochs"),
            ("code", "display(T.ttt_epochs(ws))\n" + fig("pr1718_ttt_epochs")),
        ],
    ),
    "05_pr2011_cross_base_regularizers": (
        "PR #2011: regularizers across bases",
        "PR #2011: regularizer effects do not transfer between bases; the analyses of hidden states "
        "and weights behind that claim. First the paper's figures from its published data, then the "
        "same analyses on this checkpoint (against its GPTQ copy) and on a small reg × quant matrix.",
        [
            ("md", "## The paper's numbers"),
            *[
                ("code", fig(f"paper_pr2011_{n}"))
                for n in (
                    "cross_base_signs",
                    "pipeline_waterfall",
                    "pre_post_quant",
                    "pqt_compounding",
                    "lambda_budget",
                    "reg_quant_matrix",
                    "canonical_metrics",
                    "depth_trajectory",
                    "cka_heatmap",
                )
            ],
            ("md", "## This checkpoint: weights"),
            *[("code", fig(f"pr2011_{n}")) for n in ("svd_spectrum", "svd_flatness", "svd_differential")],
            ("md", "## This checkpoint: hidden states"),
            ("code", 'display(T.fingerprint(ws, "hidden_metrics").head())'),
            *[
                ("code", fig(f"pr2011_{n}"))
                for n in (
                    "3d_pca",
                    "coord_distribution",
                    "l2norm_distribution",
                    "canonical_metrics",
                    "depth_trajectory",
                    "logit_lens",
                    "cka_heatmap",
                    "cka_layers",
                    "hidden_quant",
                )
            ],
            (
                "md",
                "## A small reg × quant matrix\nTwo CPU-sized bases, a no-regularizer control, a single "
                "regularizer and a pair; every PR #2011 hidden-state scheme.",
            ),
            ("code", "res = T.matrix(ws)\ndisplay(res.pipeline.head())"),
            *[
                ("code", fig(f"pr2011_matrix_{n}"))
                for n in (
                    "hidden_heatmaps",
                    "cross_base_signs",
                    "pre_post_quant",
                    "lambda_budget_A",
                    "paired_deltas",
                )
            ],
        ],
    ),
}


def build(name: str) -> nbformat.NotebookNode:
    title, intro, body = NOTEBOOKS[name]
    nb = new_notebook(cells=_cells(name, title, intro, body))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main(out: Path = HERE) -> list[Path]:
    paths = []
    for name in NOTEBOOKS:
        nb = build(name)
        for i, cell in enumerate(nb.cells):  # stable ids keep rebuilds diff-free
            cell["id"] = f"{name[:2]}-{i:02d}"
        nbformat.validate(nb)
        path = out / f"{name}.ipynb"
        path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
