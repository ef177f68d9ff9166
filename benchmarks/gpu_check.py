"""``make gpu-check``: the record stack on one CUDA device, one table, under 8 minutes.

On a CUDA machine it measures, for the ``record`` preset (35,943,512 parameters):

1. training: ``--steps`` optimizer steps (default 200) of 786,432 tokens with
   ``torch.compile`` and bf16 autocast through qlab's own trainer (warm-up 20 + 20 steps
   discarded, as the record) — tokens/s per GPU against the record log's ~0.96 M
   tokens/s per H100;
2. NS5 (bf16) over every Muon matrix of the model, seconds per optimizer step;
3. GPTQ of the whole model by the record policy on the GPU (Hessians from calibration
   batches) — seconds, and the share of codes identical to the same GPTQ on the CPU;
4. a sliding-window evaluation (stride 64) of 1,048,576 tokens — seconds and tokens/s;
5. peak GPU memory.

Data: the embedded corpus tokenized at vocab 8,192 (no network); throughput does not
depend on the text, and the bpb printed is not a FineWeb number. ``--dry-run`` runs the
same code on the CPU with the ``tiny`` preset and a few steps (the tests do this).

    python -m benchmarks.gpu_check [--steps 200] [--out runs/gpu_check] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qlab.data import build_byte_tables, default_dataset, load_tokenizer
from qlab.eval.bpb import evaluate_bpb
from qlab.io.checkpoint import load_weights, resume_state
from qlab.model.gpt import GPT
from qlab.quant.model_quant import calibration_batches, model_hessians
from qlab.quant.policy import quantize_state_dict, record_policy
from qlab.quant.tensor import QuantizedTensor
from qlab.train.config import resolve_configs
from qlab.train.muon import zeropower_ns5
from qlab.train.trainer import train

RECORD_TOKENS_PER_GPU = 0.96e6  # the PR #1394 logs: ~7.7 M tokens/s on 8×H100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(args, device: torch.device, out: Path) -> tuple[dict, GPT]:
    preset = "tiny" if args.dry_run else "record"
    over = {"iterations": args.steps, "out_dir": str(out / "train"), "val_every": 0,
            "max_wallclock_seconds": 0.0, "val_max_tokens": 65_536, "final_sliding": False,
            "log_every": max(args.steps // 4, 1), "device": str(device), "checkpoint_every": 0}  # fmt: skip
    if not args.dry_run:
        over.update(compile=True, autocast="bf16")
    else:
        over.update(train_batch_tokens=1024, warmup_steps=1)
    cfg, model_cfg = resolve_configs(preset, over, {"vocab_size": args.vocab}, env={})
    result = train(cfg, model_cfg, progress=False)
    model = GPT(model_cfg)
    load_weights(model, resume_state(out / "train")["model"], str(out / "train"))
    row = {"train tokens/s per GPU": result.tokens_per_second, "train steps": result.steps,
           "train seconds (timed steps)": result.train_seconds, "val_bpb (embedded corpus)": result.val_bpb,
           "record tokens/s per GPU": RECORD_TOKENS_PER_GPU,
           "ratio to record": result.tokens_per_second / RECORD_TOKENS_PER_GPU}  # fmt: skip
    return row, model.to(device)


def _ns5(model: GPT, device: torch.device) -> dict:
    mats = [p.detach() for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for m in mats[:2]:
        zeropower_ns5(m, dtype=dtype)  # warm-up (kernels, cuBLAS handles)
    _sync(device)
    t0 = time.perf_counter()
    for m in mats:
        zeropower_ns5(m, dtype=dtype)
    _sync(device)
    return {"NS5 seconds per step (all matrices)": time.perf_counter() - t0, "NS5 matrices": len(mats)}


def _gptq(model: GPT, info, device: torch.device, dry: bool) -> dict:
    policy = record_policy("record_small" if dry else "record")
    batches = calibration_batches(info, 2 if dry else 16, seq_len=model.config.train_seq_len,
                                  batch_seqs=2 if dry else 48)  # fmt: skip
    batches = [b.to(device) for b in batches]
    hessians = model_hessians(model, policy, batches)
    sd = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _sync(device)
    t0 = time.perf_counter()
    on_device = quantize_state_dict(sd, policy, hessians)
    _sync(device)
    seconds = time.perf_counter() - t0
    cpu_h = {k: h.cpu() for k, h in hessians.items()}
    cpu = quantize_state_dict({k: v.cpu() for k, v in sd.items()}, policy, cpu_h)
    same = total = 0
    for name, q in cpu.items():
        if isinstance(q, QuantizedTensor):
            same += int((q.codes == on_device[name].codes.cpu()).sum())
            total += q.codes.numel()
    return {"GPTQ seconds (whole model, on device)": seconds,
            "GPTQ codes identical to CPU": same / max(total, 1)}  # fmt: skip


def _sliding(model: GPT, info, device: torch.device, dry: bool) -> dict:
    n = 16_384 if dry else 1 << 20
    tables = build_byte_tables(load_tokenizer(info.tokenizer_path), model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (n + 1,), generator=g)
    _sync(device)
    t0 = time.perf_counter()
    evaluate_bpb(model, tokens, tables, seq_len=model.config.eval_seq_len, batch_seqs=32, stride=64,
                 device=device, autocast="bf16" if device.type == "cuda" else None)  # fmt: skip
    _sync(device)
    s = time.perf_counter() - t0
    return {"sliding eval seconds (stride 64)": s, "sliding eval tokens": n, "sliding eval tokens/s": n / s}


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA device (pass --dry-run to exercise the script on the CPU)")
    out = Path(args.out)
    info = default_dataset(vocab_size=args.vocab)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"}
    t0 = time.perf_counter()
    train_row, model = _train(args, device, out)
    rows.update(train_row)
    model.eval()
    rows.update(_ns5(model, device))
    rows.update(_gptq(model, info, device, args.dry_run))
    rows.update(_sliding(model, info, device, args.dry_run))
    if device.type == "cuda":
        rows["peak GPU memory (GiB)"] = torch.cuda.max_memory_allocated(device) / 2**30
    rows["total seconds"] = time.perf_counter() - t0
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab", type=int, default=None, help="default 8192 (1024 with --dry-run)")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny preset: checks the script runs")
    args = p.parse_args(argv)
    if args.vocab is None:
        args.vocab = 1024 if args.dry_run else 8192
    if args.dry_run:
        args.steps = min(args.steps, 3)
    rows = run(args)
    print("| measurement | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
