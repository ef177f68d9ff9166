"""The training loop: ``train(TrainConfig, ModelConfig) -> TrainResult``.

nanoGPT-shaped and meant to be read top to bottom. One optimizer step:
  1. take this rank's share of the global batch from the loader and split it into
     ``grad_accum`` micro-batches;
  2. forward + backward each (DDP's ``no_sync`` on all but the last, so gradients are
     all-reduced once), loss scaled by 1/grad_accum;
  3. clip the global gradient norm, set lr (flat, then linear warm-down by wallclock or
     step fraction) and Muon's momentum warm-up, step Muon + AdamW, update the EMA.
Before the loop, ``warmup_steps`` steps are run and thrown away (weights, optimizer,
loader and RNG restored) so torch.compile's warm-up does not count. Depth recurrence is
switched on at ``model_config.loop_start_frac`` of training. Training time excludes
validation and checkpointing, as in Parameter Golf.

Optional extras (all off by default): int-b fake-quant QAT from ``qat_start_frac`` on
(``qlab.train.qat``; the optimizer keeps updating the fp weights), SWA snapshots every
``swa_every`` warm-down steps blended with the EMA into the shipped weights
(``qlab.train.swa``), and the entropy-bucket curriculum drawing batches instead of the
shuffled loader (``qlab.train.curriculum``). Their state is part of the resume state.

Launch under ``torchrun`` for DDP (NCCL on GPU, gloo on CPU). Every rank runs the
same optimizer update on the averaged gradient, so all ranks hold identical weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlab.config import ModelConfig
from qlab.errors import ConfigError, NumericalError
from qlab.eval.bpb import autocast_context, evaluate_bpb, resolve_autocast
from qlab.eval.context import validation_inputs
from qlab.io import checkpoint as ckpt
from qlab.io.outputs import folder_kind, output_lock, refuse_inputs
from qlab.io.runlog import METRICS_NAME, RunLog
from qlab.model.gpt import GPT
from qlab.model.modes import swapped_weights
from qlab.train import distributed as D
from qlab.train.config import TrainConfig
from qlab.train.curriculum import CurriculumSampler, build_manifest
from qlab.train.ema import EMA
from qlab.train.loss import LossWithRegularizers
from qlab.train.optim import Optimizers, build_optimizers
from qlab.train.qat import disable_qat, enable_qat, qat_modules
from qlab.train.regularizers import build_regularizers
from qlab.train.schedule import (
    looping_enabled,
    lr_multiplier,
    progress_fraction,
    training_budget_seconds,
)
from qlab.train.setup import build_loader, check_resume_compatible, open_training_data, resolve_device
from qlab.train.shipped import shipped_weights, weights_kind
from qlab.train.swa import SWA


@dataclass
class TrainResult:
    """Outcome of :func:`train`; ``val_*`` are measured on the saved (EMA) weights."""

    run_dir: Path
    steps: int
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    train_loss: float
    val_loss: float | None
    val_bpb: float | None
    stopped_by: str  # "iterations" or "wallclock"
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


# ---- the loop ------------------------------------------------------------------------------------


class _Trainer:
    """State of one training run; methods are the steps of the loop."""

    def __init__(self, config: TrainConfig, model_config: ModelConfig, resume: bool, progress: bool) -> None:
        self.config, self.model_config = config, model_config
        self.device = D.setup(resolve_device(config.device))
        self.rank, self.world = D.rank(), D.world_size()
        self.accum = config.grad_accum_for(self.world)
        self.seqs_per_rank = config.seqs_per_rank(self.world)
        if self.seqs_per_rank % self.accum:
            raise ConfigError(
                f"{self.seqs_per_rank} sequences per rank do not split into {self.accum} micro-steps"
            )
        self.run_dir = Path(config.out_dir)
        self.progress = progress and D.is_main()
        self.log = RunLog(self.run_dir / METRICS_NAME)

        torch.manual_seed(config.seed)
        info = open_training_data(config, model_config.vocab_size)
        self.model = GPT(model_config).to(self.device)
        self.has_loop = model_config.loop_layers is not None
        self.opts: Optimizers = build_optimizers(self.model, config)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.loader = build_loader(config, info.train_files, self.rank, self.world)
        self.sampler = self._build_sampler() if config.curriculum_buckets > 0 else None
        self.swa = SWA(config.swa_every) if config.swa_every > 0 else None
        self.frac = 0.0  # progress fraction of the step about to run
        self.val_tokens, self.byte_tables = validation_inputs(
            info, config.train_seq_len, model_config.vocab_size, config.tokenizer_path
        )

        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.saved_step = -1
        self.resumed = resume and ckpt.has_checkpoint(self.run_dir)
        if self.resumed:
            self._load_resume_state()
        elif ckpt.has_checkpoint(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds a checkpoint: pass --resume, or choose another --out"
            )
        elif D.is_main() and self.log.path.exists():
            self.log.truncate_after(-1)  # a run killed before its first checkpoint: start the log afresh

        self.step_module = LossWithRegularizers(self.model, build_regularizers(config.regs))
        compiled = config.compile_on(self.device.type)
        # torch.compile of a Module returns a Module; its stubs only promise a callable
        module = cast(nn.Module, torch.compile(self.step_module)) if compiled else self.step_module
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.module = module
        self.budget = training_budget_seconds(config.max_wallclock_seconds, config.gptq_reserve_seconds)

    # -- resume ---------------------------------------------------------------------------------
    def _load_resume_state(self) -> None:
        state = ckpt.resume_state(self.run_dir)
        check_resume_compatible(state["config"], self.config, self.model_config)
        ckpt.load_weights(self.model, state["model"], str(self.run_dir / ckpt.STATE_NAME))
        self.opts.load_state_dict(state["optimizers"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ConfigError("--resume: the checkpoint was trained without EMA but ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        t = state["trainer"]
        self.step, self.tokens_seen, self.elapsed = int(t["step"]), int(t["tokens_seen"]), float(t["elapsed"])
        self.loader.load_state_dict(t["loader"])
        self.saved_step = self.step
        torch.set_rng_state(t["rng_torch"])
        if self.device.type == "cuda" and t.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(t["rng_cuda"], self.device)
        if self.has_loop:
            self.model.set_looping(bool(t["looping"]))
        self._load_extras_state(t)
        if D.is_main():
            self.log.truncate_after(self.step)

    def _load_extras_state(self, t: dict[str, Any]) -> None:
        """QAT switch, SWA mean and curriculum position from the trainer state."""
        for name, obj in (("swa", self.swa), ("curriculum", self.sampler)):
            if obj is not None:
                if t.get(name) is None:
                    raise ConfigError(f"--resume: the checkpoint holds no {name} state but {name} is on")
                obj.load_state_dict(t[name])
        if t.get("qat_on", False):
            self.enable_qat()

    def _build_sampler(self):
        """The curriculum sampler over the loader's shards (every rank builds the same manifest)."""

        c = self.config
        manifest = build_manifest(self.loader, c.train_seq_len, c.curriculum_buckets)
        return CurriculumSampler(manifest, c.curriculum_floor, c.seed, self.rank, self.world)

    def enable_qat(self) -> None:
        c = self.config
        enable_qat(self.model, c.qat_bits, c.qat_k, c.qat_patterns)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed,
            "loader": self.loader.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "looping": bool(self.has_loop and self.model.looping),
            "world_size": self.world,
            "qat_on": bool(qat_modules(self.model)),
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "curriculum": self.sampler.state_dict() if self.sampler is not None else None,
        }

    # -- the shipped weights ----------------------------------------------------------------------
    @property
    def weights_kind(self) -> str:
        return weights_kind(self.ema, self.swa)

    def shipped_weights(self) -> dict[str, Tensor]:
        return shipped_weights(self.model, self.ema, self.swa, self.config.swa_blend)

    # -- one optimizer step ---------------------------------------------------------------------
    def next_batch(self) -> tuple[Tensor, Tensor]:
        """This rank's sequences for one optimizer step: curriculum sampler, else the loader."""
        if self.sampler is not None:
            return self.sampler.next_batch(self.seqs_per_rank, self.frac)
        return self.loader.next_batch(self.seqs_per_rank)

    def train_step(self) -> dict[str, Tensor]:
        x_all, y_all = self.next_batch()
        self.opts.zero_grad()
        sums: dict[str, Tensor] = {}
        for i, (x, y) in enumerate(zip(x_all.chunk(self.accum), y_all.chunk(self.accum))):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = i == self.accum - 1
            module = self.module  # DistributedDataParallel when world > 1
            ddp = nn.parallel.DistributedDataParallel
            sync = module.no_sync() if isinstance(module, ddp) and not last else contextlib.nullcontext()
            with sync:
                with autocast_context(self.device, self.config.autocast):
                    loss, logs = self.module(x, y)
                (loss / self.accum).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / self.accum
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.opts.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return sums

    def discard_warmup(self) -> None:
        """Run ``warmup_steps`` steps, then as many with the loop on (compiling both graphs, as
        the record does: 20 + 20), then restore weights, optimizers, EMA, loader and RNG."""
        n = self.config.warmup_steps
        if n <= 0 or self.resumed:
            return
        model_state = copy.deepcopy(self.model.state_dict())
        opt_state = copy.deepcopy(self.opts.state_dict())
        ema_state = copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None
        loader_state, rng = self.loader.state_dict(), torch.get_rng_state()
        sampler_state = self.sampler.state_dict() if self.sampler is not None else None
        for looping in (False, True) if self.has_loop else (False,):
            if self.has_loop:
                self.model.set_looping(looping)
            for i in range(n):
                self.opts.apply_schedule(i, 1.0)
                self.train_step()
        if self.has_loop:
            self.model.set_looping(False)
        self.model.load_state_dict(model_state)
        self.opts.load_state_dict(opt_state)
        if self.ema is not None and ema_state is not None:
            self.ema.load_state_dict(ema_state)
        self.loader.load_state_dict(loader_state)
        if self.sampler is not None:
            self.sampler.load_state_dict(sampler_state)
        torch.set_rng_state(rng)

    # -- evaluation, logging, checkpoints ---------------------------------------------------------
    def evaluate(self, stride: int | None = None):
        """Validation of the fp model (QAT's fake quant off, as the checkpoint is loaded);
        ``stride`` overrides the configured one (the final sliding-window score)."""
        qat_on = bool(disable_qat(self.model))
        try:
            return self._evaluate_bpb(stride or self.config.eval_stride)
        finally:
            if qat_on:
                self.enable_qat()

    def _evaluate_bpb(self, stride: int | None):
        c = self.config
        return evaluate_bpb(
            self.model,
            self.val_tokens,
            self.byte_tables,
            seq_len=c.train_seq_len,
            batch_seqs=c.val_batch_seqs,
            stride=stride,
            device=self.device,
            max_tokens=c.val_max_tokens or None,
            autocast=resolve_autocast(c.autocast, self.device),
        )

    def save(self) -> None:
        if self.saved_step == self.step:  # e.g. the final step was also a checkpoint_every step
            return
        self.saved_step = self.step
        if D.is_main():
            kind = self.weights_kind
            ckpt.save_checkpoint(
                self.run_dir,
                self.model,
                self.ema,
                self.opts,
                self.trainer_state(),
                self.model_config,
                self.config,
                shipped=(kind, self.shipped_weights()) if kind not in ("ema", "raw") else None,
            )
        D.barrier()

    def write(self, record: dict[str, Any]) -> None:
        if D.is_main():
            self.log.append(record)

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        c = self.config
        self.discard_warmup()
        bar = tqdm(total=c.iterations, initial=self.step, desc="train", disable=not self.progress)
        self.last_log = (self.step, self.elapsed)
        self.last_loss = float("nan")
        while (stopped_by := self.stop_reason()) is None:
            lr_mult = self.apply_schedules()
            logs = self.timed_step()
            if self.swa is not None:
                self.swa.maybe_update(self.model, self.step, lr_mult < 1.0)
            bar.update(1)
            if self.due(c.log_every) or self.step == c.iterations:
                self.log_train(logs, lr_mult)
                bar.set_postfix(loss=f"{self.last_loss:.4f}")
            if self.due(c.val_every) and self.step < c.iterations:
                r = self.evaluate()
                self.write({"kind": "val", "step": self.step, "val_loss": r.val_loss, "val_bpb": r.val_bpb,
                            "elapsed": self.elapsed})  # fmt: skip
            if self.due(c.checkpoint_every):
                self.save()
        bar.close()
        return self.finish(stopped_by)

    def due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def stop_reason(self) -> str | None:
        if self.step >= self.config.iterations:
            return "iterations"
        if self.budget > 0 and self.elapsed >= self.budget:
            return "wallclock"
        return None

    def apply_schedules(self) -> float:
        """Loop switch, LR multiplier and Muon momentum for the step about to run."""
        c = self.config
        frac = progress_fraction(self.step, c.iterations, self.elapsed, self.budget)
        self.frac = frac
        if c.qat_bits > 0 and frac >= c.qat_start_frac and not qat_modules(self.model):
            self.enable_qat()
        if self.has_loop:
            self.model.set_looping(looping_enabled(frac, self.model_config.loop_start_frac))
        lr_mult = lr_multiplier(frac, c.warmdown_frac, c.min_lr)
        self.opts.apply_schedule(self.step, lr_mult)
        return lr_mult

    def timed_step(self) -> dict[str, Tensor]:
        """One optimizer step; its time is added to the (rank-synchronised) training clock."""
        t0 = time.perf_counter()
        logs = self.train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = self.elapsed + time.perf_counter() - t0
        # With a wallclock budget every rank must take the same schedule and stop decisions.
        self.elapsed = D.all_reduce_max(elapsed, self.device) if self.budget > 0 else elapsed
        self.step += 1
        self.tokens_seen += self.config.train_batch_tokens
        return logs

    def log_train(self, logs: dict[str, Tensor], lr_mult: float) -> None:
        means = {k: D.all_reduce_mean(v.float()).item() for k, v in logs.items()}
        self.last_loss = means.pop("ce")
        if not math.isfinite(self.last_loss):
            raise NumericalError(
                f"training loss is {self.last_loss} at step {self.step} (lr multiplier {lr_mult:.3g}); "
                f"the last checkpoint in {self.run_dir} is left as it was"
            )
        step0, elapsed0 = self.last_log
        tps = (self.step - step0) * self.config.train_batch_tokens / max(self.elapsed - elapsed0, 1e-9)
        self.last_log = (self.step, self.elapsed)
        lrs = {f"lr_{k}": v for k, v in self.opts.current_lrs().items()}
        looping = bool(self.has_loop and self.model.looping)
        self.write({"kind": "train", "step": self.step, "train_loss": self.last_loss, "lr_mult": lr_mult,
                    **lrs, "tokens_per_s": tps, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                    "looping": looping, **means})  # fmt: skip

    def finish(self, stopped_by: str) -> TrainResult:
        """Final validation on the shipped weights (EMA and/or SWA blend), final checkpoint, summary."""
        sliding = None
        with swapped_weights(self.model, self.shipped_weights()):
            r = self.evaluate()
            if self.config.final_sliding:
                sliding = self.evaluate(stride=self.config.sliding_stride)
        identical = D.ranks_identical(self.model)
        self.save()
        tps = self.tokens_seen / self.elapsed if self.elapsed > 0 else 0.0
        self.write({"kind": "final", "step": self.step, "val_loss": r.val_loss, "val_bpb": r.val_bpb,
                    "tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "tokens_per_s": tps,
                    "weights": self.weights_kind, "stopped_by": stopped_by,
                    "world_size": self.world, "ranks_identical": identical,
                    **({"val_bpb_sliding": sliding.val_bpb} if sliding is not None else {})})  # fmt: skip
        if not identical:  # a non-deterministic update somewhere made the ranks drift apart
            raise NumericalError(f"DDP ranks ended training with different weights (world size {self.world})")
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            tokens_seen=self.tokens_seen,
            train_seconds=self.elapsed,
            tokens_per_second=tps,
            train_loss=self.last_loss,
            val_loss=r.val_loss,
            val_bpb=r.val_bpb,
            stopped_by=stopped_by,
            world_size=self.world,
        )


def train(
    config: TrainConfig, model_config: ModelConfig, *, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Train ``model_config`` under ``config``; checkpoints and metrics go to ``config.out_dir``.

    ``resume=True`` continues from the checkpoint in ``out_dir`` (if any) and reaches the
    same weights as an uninterrupted run. Under torchrun every rank calls this.
    """
    if config.train_seq_len != model_config.train_seq_len:
        model_config = model_config.replace(train_seq_len=config.train_seq_len)
    run_dir = Path(config.out_dir)
    if config.data != "embedded":
        refuse_inputs(run_dir, [config.data])
    if folder_kind(run_dir) == "dataset":
        raise ConfigError(f"{run_dir}: holds a dataset; choose another --out for the run")
    owns_group = not D.is_initialized()  # tear down only a process group this call created
    # one writer per run directory: rank 0 holds the lock (torchrun sets RANK before we start)
    lock = output_lock(run_dir, "run directory") if os.environ.get("RANK", "0") == "0" else nullcontext()
    try:
        with lock:
            return _Trainer(config, model_config, resume, progress).run()
    finally:
        if owns_group:
            D.teardown()
