"""Training schedules: LR multiplier, Muon momentum warm-up, depth-recurrence switch.

All schedules are functions of a *progress fraction* in [0, 1]: the wallclock fraction
of the training budget when a wallclock cap is set (Parameter Golf's records warm down
over the last 66.7 % of 600 s − 12 s reserved for GPTQ), else the step fraction.
"""

from __future__ import annotations


def training_budget_seconds(max_wallclock_seconds: float, gptq_reserve_seconds: float) -> float:
    """Seconds the loop may train: the cap minus the GPTQ reserve (0 = no cap)."""
    if max_wallclock_seconds <= 0:
        return 0.0
    return max(max_wallclock_seconds - gptq_reserve_seconds, 0.0)


def progress_fraction(step: int, iterations: int, elapsed_s: float, budget_s: float) -> float:
    """How far training is, in [0, 1]: by wallclock when a budget is set, else by steps.

    With both a budget and an iteration count, the further along of the two wins, since
    whichever runs out first ends training.
    """
    by_step = step / iterations if iterations > 0 else 0.0
    by_time = elapsed_s / budget_s if budget_s > 0 else 0.0
    return min(max(by_step, by_time), 1.0)


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float = 0.0) -> float:
    """Flat at 1, then linear down to ``min_lr`` (default 0) over the last ``warmdown_frac``."""
    if warmdown_frac <= 0:
        return 1.0
    start = 1.0 - warmdown_frac
    if frac < start:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Momentum ramps linearly from ``start`` to ``end`` over ``warmup_steps`` steps."""
    if warmup_steps <= 0:
        return end
    t = min(step / warmup_steps, 1.0)
    return (1.0 - t) * start + t * end


def looping_enabled(frac: float, loop_start_frac: float) -> bool:
    """Depth recurrence is on from ``loop_start_frac`` of training (negative = never)."""
    return loop_start_frac >= 0 and frac >= loop_start_frac
