"""``qlab fingerprint``: spectral and activation fingerprints of a checkpoint.

Weight analyses (SVD spectra per matrix and family, flatness, stable/effective rank,
WeightWatcher α, Δσ% against ``--against`` and before vs after quantization by
``--policy``) work on any checkpoint qlab reads. For a qlab run directory with data
(``--data``, default the embedded corpus) the activation analyses run too: depth
trajectory with logit lens, hidden-state geometry, PCA, CKA, hidden-state quantization
and (``--sensitivity``) per-block quantization sensitivity. Each table is written as
CSV and JSON, each figure as a PNG, into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from qlab.analysis.fingerprint import fingerprint, write_fingerprint
from qlab.cli._args import plain
from qlab.errors import ConfigError
from qlab.io.outputs import claim_output_dir
from qlab.plots.fingerprints import render_fingerprint_figures
from qlab.progress import cli_progress
from qlab.quant.policy import load_policy

HELP = "SVD spectra, CKA, depth and hidden-state geometry of a checkpoint"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fingerprint",
        help=HELP,
        description=plain(__doc__),
    )
    p.add_argument(
        "checkpoint", help="any checkpoint qlab reads (run dir, .safetensors, HF dir, .pt, .ptz, .qlab)"
    )
    p.add_argument("--against", help="reference checkpoint for Δσ%% (and CKA, if a run directory)")
    p.add_argument("--data", default="embedded", help="dataset directory, 'embedded' (default) or 'none'")
    p.add_argument("--policy", default="record", help="quantization policy preset or file, or 'none'")
    p.add_argument(
        "--tokens", type=int, default=1024, help="validation tokens for activations (default 1024)"
    )
    p.add_argument("--calib-batches", type=int, default=4, help="GPTQ calibration batches (0 = RTN)")
    p.add_argument("--sensitivity", action="store_true", help="also quantize one block at a time (slower)")
    p.add_argument("--out", help="output directory (default fingerprint-<checkpoint name>)")
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty --out qlab fingerprint did not make"
    )
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _policy(spec: str):
    if spec.lower() == "none":
        return None

    return load_policy(spec)


def _file(spec: str) -> str | None:
    """A policy given as a file (an input to protect), not a preset name."""
    return spec if Path(spec).is_file() else None


def run(args: argparse.Namespace) -> int:
    if args.tokens < 8 or args.calib_batches < 0:
        raise ConfigError("--tokens must be ≥ 8 and --calib-batches ≥ 0")
    out = Path(args.out or f"fingerprint-{Path(args.checkpoint).resolve().name}")
    data = None if args.data.lower() == "none" else args.data
    claim_output_dir(
        out, "fingerprint", [args.checkpoint, args.against, data, _file(args.policy)], force=args.force
    )
    results = fingerprint(
        args.checkpoint,
        against=args.against,
        data=data,
        policy=_policy(args.policy),
        n_tokens=args.tokens,
        sensitivity=args.sensitivity,
        calib_batches=args.calib_batches,
        progress=cli_progress(args.no_progress),
    )
    tables = write_fingerprint(results, out)
    figures = []
    if not args.no_figures:
        figures = render_fingerprint_figures(results, out)
    _summary(results, out, len(tables), len(figures))
    return 0


def _summary(results: dict[str, pd.DataFrame], out: Path, n_tables: int, n_figures: int) -> None:
    meta = dict(zip(results["meta"]["key"], results["meta"]["value"]))
    print(f"checkpoint: {meta['checkpoint']} ({meta['format']})")
    if meta.get("quantizer") not in (None, "none"):
        print(f"quantized:  {meta['quantizer']}")
    if meta.get("activations") == "True":
        print(f"activations: {meta['n_tokens']} validation tokens from {meta['data']}")
    else:
        print("activations: skipped (need a qlab run directory and --data)")
    fs = results["family_summary"]
    if "flatness" in fs:
        flat = fs.pivot_table(
            index="family", columns="variant", values="flatness", aggfunc="first", sort=False
        )
        print("mean tail flatness per family (decades of σᵢ/σ₁):")
        print(flat.to_string(float_format=lambda x: f"{x:.3f}"))
    else:
        print("families: none (no qlab parameter names); per-matrix spectra in spectral_summary.csv")
    if "depth" in results:
        d = results["depth"]
        last = d.loc[d.groupby("variant")["position"].idxmax()]
        for _, r in last.iterrows():
            lens = f", bpb {r['lens_bpb']:.4f}" if "lens_bpb" in r else ""
            stats = f"kurtosis {r['kurtosis']:.2f}, mean ‖h‖ {r['mean_norm']:.2f}{lens}"
            print(f"last block [{r['variant']}]: {stats}")
    for name in ("cka_layers", "cka_variants"):
        if name in results:
            off = results[name]
            key = ("layer_a", "layer_b") if name == "cka_layers" else ("variant_a", "variant_b")
            off = off[off[key[0]] != off[key[1]]]["cka"]
            if len(off):
                print(f"{name}: off-diagonal linear CKA {off.min():.3f} … {off.max():.3f}")
    print(f"wrote {n_tables} table files and {n_figures} figures to {out}/")
