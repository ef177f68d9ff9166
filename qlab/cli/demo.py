"""``qlab demo``: the whole workbench end to end on the embedded corpus, on CPU."""

from __future__ import annotations

import argparse

import torch

from qlab.demo import DemoState, demo_threads, run_demo
from qlab.progress import cli_progress

LABELS = {
    "dataset": "embedded corpus tokenized",
    "train": "tiny model trained",
    "evaluate": "validation bpb measured",
    "quantize": "quantized with the record policy (GPTQ), artifact written, pipeline evaluated",
    "entropy": "entropy report (predicted vs real brotli-11 bytes)",
    "sweep": "rate-distortion sweep",
    "fingerprint": "fingerprints (spectra, CKA, depth, geometry)",
    "matrix": "smoke reg x quant matrix",
    "figures": "figures regenerated",
}


HELP = "run the end-to-end demo on the embedded corpus (CPU, a few minutes)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=HELP)
    p.add_argument("--out", default="runs/demo", help="where everything is written (default: runs/demo)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (default: the tiny preset's)")
    p.add_argument(
        "--fresh", action="store_true", help="retrain and rebuild instead of reusing earlier results"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: OMP_NUM_THREADS, else the cores the load average leaves idle)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="train, evaluate, quantize and the entropy report only (about 2 minutes on 2 cores); "
        "a later full demo reuses the checkpoint",
    )
    p.set_defaults(func=main)


QUICK_SKIPS = ("sweep", "fingerprint", "matrix", "figures")


def _headline(name: str, n: dict) -> str:
    """The number a step measured, printed as soon as it is known."""
    if name == "train" and "train_steps" in n:
        return (
            f"{n['train_steps']} steps, {n['train_tokens_per_s']:,.0f} tokens/s, loss {n['train_loss']:.3f}"
        )
    if name == "evaluate":
        return f"val_bpb {n['val_bpb']:.4f} (unigram {n['unigram_bpb']:.4f})"
    if name == "quantize" and "quantized_bpb" in n:
        tax = n["quant_tax_mbpb"]
        return f"quantized val_bpb {n['quantized_bpb']:.4f} ({tax:+.2f} mBPB), {n['artifact_bytes']:,} B"
    totals = n.get("entropy_totals", {})
    if name == "entropy" and "prediction_error" in totals:
        err = 100 * totals["prediction_error"]
        return f"predicted {totals['predicted_bytes']:,.0f} B, {err:+.2f} % vs brotli-11"
    return ""


def _on_step(name: str, state: DemoState) -> None:
    number = _headline(name, state.numbers)
    line = f"[demo] {LABELS.get(name, name)} ({state.timings[name]:.1f} s)" + (
        f": {number}" if number else ""
    )
    print(line, flush=True)


def _start_line(progress: bool):
    """Without progress bars (a log file, CI) a line as each step starts, so a slow step
    is never silent; with bars the bar says it."""

    def on_start(name: str, i: int, n: int) -> None:
        if not progress:
            print(f"[demo] step {i}/{n}: {name} …", flush=True)

    return on_start


def main(args: argparse.Namespace) -> int:
    threads, before = demo_threads(args.threads), torch.get_num_threads()
    progress = cli_progress(args.quiet)
    print(f"[demo] {threads} torch thread(s); writing {args.out}", flush=True)
    torch.set_num_threads(threads)
    try:
        state = run_demo(
            args.out,
            iterations=args.iterations,
            fresh=args.fresh,
            progress=progress,
            on_step=_on_step,
            skip=QUICK_SKIPS if args.quick else (),
            on_start=_start_line(progress),
        )
    finally:  # an in-process caller (a notebook, the tests) keeps its own setting
        torch.set_num_threads(before)
    n = state.numbers
    print()
    print("qlab demo — results")
    corpus = f"{n['train_tokens']:,} train / {n['val_tokens']:,} validation tokens"
    print(f"  corpus: {corpus}, vocab {n['vocab_size']}")
    if "train_steps" in n:
        print(f"  training: {n['train_steps']} steps, {n['train_tokens_per_s']:,.0f} tokens/s")
    else:
        print("  training: reused the finished checkpoint (use --fresh to retrain)")
    print(
        f"  val_bpb {n['val_bpb']:.4f}  vs unigram {n['unigram_bpb']:.4f}  vs uniform {n['uniform_bpb']:.4f}"
        f"  ({n['val_tokens_scored']:,} tokens, {n['val_bytes']:,} bytes)"
    )
    if "quantized_bpb" in n:
        print(
            f"  record policy: pre-quant {n['pre_quant_bpb']:.4f} -> quantized {n['quantized_bpb']:.4f}"
            f" -> sliding {n['sliding_bpb']:.4f} bpb (quant tax {n['quant_tax_mbpb']:+.2f} mBPB),"
            f" artifact {n['artifact_bytes']:,} bytes"
        )
    totals = n.get("entropy_totals", {})
    if "prediction_error" in totals:
        print(
            f"  entropy report: predicted {totals['predicted_bytes']:,.0f} bytes,"
            f" {100 * totals['prediction_error']:+.2f} % vs real brotli-11"
        )
    if "matrix_cells" in n:
        print(f"  reg x quant matrix: {n['matrix_cells']} cells")
    if "figures" in n:
        print(f"  figures: {n['figures']} PNGs")
    print()
    print("written:")
    for key, path in state.written.items():
        print(f"  {key:<12} {path}")
    return 0
