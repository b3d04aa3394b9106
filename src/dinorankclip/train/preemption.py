"""SLURM's warning signals: turn SIGTERM/SIGUSR1 into a checkpoint at the loop's next check point and a clean exit.

SLURM sends SIGTERM (or the `--signal` of the job, often USR1) some time before it kills a preempted or
timed-out job. The handler only raises a flag; the training loop reads it at its next check point (a log step,
checkpoint step or epoch end, at most `pretrain.log_every` steps away), writes a checkpoint and raises
`Preempted`, whose exit status makes Snakemake's retry (or SLURM's requeue) start the job again, and the restarted
job resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STATUS = 75  # EX_TEMPFAIL: "try again later"


class Preempted(RuntimeError):
    """The job was asked to stop; its state is checkpointed and a rerun resumes it."""

    resumable = True


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _set(self, signum: int, frame) -> None:
        if self.signal is None:
            log.warning("received %s: checkpointing after the current step", signal.Signals(signum).name)
        self.signal = signum


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """A flag that turns true on SIGTERM/SIGUSR1 while the block runs; the previous handlers come back after."""
    flag = StopFlag()
    previous = {sig: signal.signal(sig, flag._set) for sig in SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
