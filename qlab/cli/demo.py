"""``qlab demo``: the whole workbench end to end on the embedded corpus, on CPU."""

from __future__ import annotations

import argparse

from qlab.demo import DemoState, run_demo

LABELS = {
    "dataset": "embedded corpus tokenized",
    "train": "tiny model trained",
    "evaluate": "validation bpb measured",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded corpus (CPU, a few minutes)")
    p.add_argument("--out", default="runs/demo", help="where everything is written (default: runs/demo)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (default: the tiny preset's)")
    p.add_argument(
        "--fresh", action="store_true", help="retrain and rebuild instead of reusing earlier results"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def _on_step(name: str, state: DemoState) -> None:
    print(f"[demo] {LABELS.get(name, name)} ({state.timings[name]:.1f} s)", flush=True)


def main(args: argparse.Namespace) -> int:
    state = run_demo(
        args.out, iterations=args.iterations, fresh=args.fresh, progress=not args.quiet, on_step=_on_step
    )
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
    for key, extra in _extra_lines(n):
        print(f"  {key}: {extra}")
    print()
    print("written:")
    for key, path in state.written.items():
        print(f"  {key:<12} {path}")
    return 0


def _extra_lines(n: dict) -> list[tuple[str, str]]:
    """Lines for the steps that later issues add (quantization, entropy, …), when present."""
    return [(k, str(v)) for k, v in n.get("extra_lines", {}).items()]
