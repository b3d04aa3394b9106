"""Whether the running step computes its diagnostic statistics: the injection's and the transition heads' strength.

They are detached batch statistics, read only where something records them: validation, and the training steps
that log (`pretrain.log_every`). Computed on every other training step too, they took ~8% of a demo drc-r3 step
(one CPU thread) for values nothing read. On unless a caller turns them off, so every other caller gets them as
before; the statistics are detached, so turning them off changes no loss, gradient or update.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_COMPUTED: ContextVar[bool] = ContextVar("dinorankclip_diagnostics", default=True)


def computed() -> bool:
    """Whether the running step computes its diagnostic statistics."""
    return _COMPUTED.get()


@contextmanager
def computing(flag: bool) -> Iterator[None]:
    """Within the block, diagnostic statistics are computed if and only if `flag`."""
    token = _COMPUTED.set(flag)
    try:
        yield
    finally:
        _COMPUTED.reset(token)
