"""The job a test fork server runs instead of the CLI (tests/test_forkserver.py): what it was given, and how it ends."""

import json
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    action = argv[0]
    if action == "echo":  # what the job sees, then the exit code asked for
        print(json.dumps({"argv": argv, "cwd": os.getcwd(), "colour": os.environ.get("COLOUR"),
                          "executable_argv": sys.argv}))
        print("to stderr", file=sys.stderr)
        return int(argv[1])
    if action == "wait":  # until a signal: SIGTERM is handled (as a preempted training does), others kill
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
        print(os.getpid(), flush=True)
        time.sleep(60)
        return 0
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"unknown action {action}")
