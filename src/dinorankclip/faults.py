"""Kill points: a job kills itself with SIGKILL at a named point when a test asks for it.

A kill timed from outside races the job and lands somewhere different on every run. A test that sets
`DINORANKCLIP_KILL_AT=<name>` instead makes the job die exactly at `kill_point(<name>)`, every time, with no
chance to clean up (as under `kill -9`, an OOM kill or a node failure), so what a rerun finds is known.
Names are `<stage>:<moment>`, e.g. `data:publish`.
"""

from __future__ import annotations

import logging
import os
import signal

KILL_ENV = "DINORANKCLIP_KILL_AT"
log = logging.getLogger(__name__)


def kill_point(name: str) -> None:
    """SIGKILL the current process if the environment variable DINORANKCLIP_KILL_AT equals `name`."""
    if os.environ.get(KILL_ENV) != name:
        return
    log.warning("kill point %s reached: SIGKILL", name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
