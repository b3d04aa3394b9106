"""`python -m dinorankclip`: the same entry point as the `dinorankclip` console script (Snakemake's jobs use this one).

Under a fork server (`dinorankclip.forkserver`, what `make demo` starts) the job runs in a fork of the server and this
process only waits for it and exits with its status.

A job that returns ends with `os._exit` once every atexit handler has run (this one, registered before anything else,
runs last) and the standard streams are flushed: the interpreter's teardown of the modules torch, open_clip and MLflow
loaded writes nothing and cost ~2.5 CPU-s per job. A job that raises ends the ordinary way.
"""

import atexit
import os
import sys

returned: list[int] = []


def end_now() -> None:
    if returned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(returned[0])


atexit.register(end_now)

from dinorankclip.forkserver import delegate  # noqa: E402  (standard library only)

forked = delegate(sys.argv)
if forked is not None:
    sys.exit(forked)

from dinorankclip.cli import main  # noqa: E402  (after the handler, so that it runs last)

returned.append(main())
sys.exit(returned[0])
