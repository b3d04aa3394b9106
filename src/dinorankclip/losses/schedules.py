"""Rank-weight schedules w(p) on training progress p = step / total_steps (METHOD.md §2).

Every schedule has the signature ``(p, w_max=2.0, p_ramp=2/3) -> float`` so a run's config can pick one by name
(`get_schedule`). Progress outside [0, 1] is clamped, so a step past the end keeps the final weight instead of
extrapolating, and a cosine ramp never turns back up for negative p.
"""

import math
from collections.abc import Callable

Schedule = Callable[..., float]

W_MAX = 2.0
P_RAMP = 2 / 3


def _ramp_fraction(p: float, p_ramp: float) -> float:
    """How far through the ramp p is, in [0, 1]."""
    return min(max(p / p_ramp, 0.0), 1.0)


def linear_clamp(p: float, w_max: float = W_MAX, p_ramp: float = P_RAMP) -> float:
    """w = w_max·clamp(p/p_ramp, 0, 1): with the defaults clamp(3p, 0, 2), RankCLIP's released epoch ramp in steps."""
    return w_max * _ramp_fraction(p, p_ramp)


def cosine_ramp(p: float, w_max: float = W_MAX, p_ramp: float = P_RAMP) -> float:
    """w = w_max·½(1 − cos(π·min(p/p_ramp, 1))): a smooth start and a flat arrival at w_max (DINORANKCLIP default)."""
    return w_max * 0.5 * (1.0 - math.cos(math.pi * _ramp_fraction(p, p_ramp)))


def constant(p: float, w_max: float = W_MAX, p_ramp: float = P_RAMP) -> float:
    """w = w_max throughout (p and p_ramp are accepted only to share the schedule signature)."""
    return w_max


SCHEDULES: dict[str, Schedule] = {"linear_clamp": linear_clamp, "cosine_ramp": cosine_ramp, "constant": constant}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name``; a ValueError naming it and the valid choices otherwise."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown rank-weight schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None


def rank_weight(name: str, step: int, total_steps: int, w_max: float = W_MAX, p_ramp: float = P_RAMP) -> float:
    """w at a 0-based global step of a run of ``total_steps`` steps under the named schedule."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return get_schedule(name)(step / total_steps, w_max=w_max, p_ramp=p_ramp)
