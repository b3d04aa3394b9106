"""A fork server for local workflow runs: the libraries jobs need are imported once, and each job is a fork.

On the 2-core machines the demo runs on, a job spends 5 to 7 CPU-seconds importing torch, open_clip and MLflow before
its work starts, and the demo has 71 jobs. `python -m dinorankclip.forkserver -- COMMAND...` (what `make demo` runs)
starts a server that imports them and then runs COMMAND with DINORANKCLIP_FORKSERVER naming the server's socket. A job
(`python -m dinorankclip ...`) that finds the variable sends its arguments, environment, working directory and
standard streams to the server and waits; the server forks, the child becomes the job, and its exit status comes back
to the waiting process, which exits with it. Signals sent to the waiting process go to the job; if it dies, the job is
killed. A job the server cannot stand in for exactly (another interpreter or checkout, or thread settings other than
those the libraries were loaded with) runs on its own, as does every job when no server runs (SLURM, `dvc repro`).

Only the standard library is imported here: the waiting process imports nothing else.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ENV = "DINORANKCLIP_FORKSERVER"

# Read by the numerical libraries when they load (OpenBLAS sizes its thread pool then), so a job whose values differ
# from the server's would compute differently in a fork: such a job runs on its own. Snakemake sets all of them to the
# job's threads; the server loads the libraries with one thread, the demo's setting for every per-run job.
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "PYTHONHASHSEED")
SERVER_THREADS = "1"

# What the stages import: the CLI, every stage's module (torch, torchvision, timm, open_clip, webdataset,
# scikit-learn, matplotlib come with them), and MLflow with the SQL store every job opens (SQLAlchemy, alembic), which
# the job imports only when it starts its run.
PRELOAD = ("dinorankclip.cli", "dinorankclip.tracking", "dinorankclip.data.source", "dinorankclip.data.download",
           "dinorankclip.models.teacher", "dinorankclip.data.features", "dinorankclip.data.captions",
           "dinorankclip.train.pretrain", "dinorankclip.train.finetune", "dinorankclip.eval.suites",
           "dinorankclip.report.build", "dinorankclip.report.measured",
           "mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.db.utils")

JOB = "dinorankclip.cli:main"  # what a fork runs, given the job's arguments without the program name
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# In each forked job's log, and the server's closing line: bench/demo_cost.py adds the server's loading to the forks.
FORKED_LINE = "fork server: this job is a fork of the server, which loaded its libraries"
FORKED = re.compile(r"^fork server: this job is a fork of the server", re.MULTILINE)
SERVED_LINE = "fork server: loaded the libraries in {loaded:.2f} CPU-s once; ran {served} jobs ({cpu:.1f} CPU-s), " \
              "{refused} ran on their own\n"
SERVED = re.compile(r"fork server: loaded the libraries in (?P<cpu>[\d.]+) CPU-s once; ran (?P<jobs>\d+) jobs")
HEADER = 8  # bytes of the request's length, sent together with the three standard streams


def identity() -> dict:
    """What must be equal between the server and a job for a fork to compute what the job would compute alone."""
    package = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    return {"prefix": sys.prefix, "package": package,
            "import_env": {key: os.environ.get(key) for key in IMPORT_TIME_ENV}}


def refusal(server: dict, job: dict) -> str | None:
    """Why the server cannot run this job (None: it can)."""
    for key in ("prefix", "package"):
        if server[key] != job[key]:
            return f"the job's {key} is {job[key]}, the server's {server[key]}"
    differ = sorted(k for k in IMPORT_TIME_ENV if server["import_env"][k] != job["import_env"][k])
    if differ:
        return f"the job's {', '.join(differ)} differ from the server's"
    return None


# -- the waiting process ---------------------------------------------------------------------------------------------

def read_message(conn: socket.socket, pending: bytearray) -> dict | None:
    """One newline-terminated JSON message from `conn` (None: the peer closed first)."""
    while b"\n" not in pending:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return json.loads(line)


def exit_code(status: int) -> int:
    """The waiting process's exit code for the job's wait status; a job killed by a signal kills it with the same."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


def forward(job: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just ended
        os.kill(job, sig)


def delegate(argv: list[str]) -> int | None:
    """Run this job in the fork server named by DINORANKCLIP_FORKSERVER and return its exit code; None when there is
    no server, it is not ready, or it cannot run this job exactly (the caller then runs the job itself)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    with conn:
        body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), **identity()}).encode()
        socket.send_fds(conn, [len(body).to_bytes(HEADER, "big")], [0, 1, 2])
        conn.sendall(body)
        pending = bytearray()
        reply = read_message(conn, pending)
        if reply is None or "refused" in reply:
            if reply is not None:
                print(f"fork server: running on its own ({reply['refused']})", file=sys.stderr)
            return None
        job = reply["pid"]
        for sig in FORWARDED:
            signal.signal(sig, lambda sig, _frame: forward(job, sig))
        done = read_message(conn, pending)
    if done is None:
        print("fork server: it stopped before the job ended", file=sys.stderr)
        return 1
    return exit_code(done["status"])


# -- the job ---------------------------------------------------------------------------------------------------------

def die_with_caller(conn: socket.socket) -> None:
    """Kill this job when its waiting process goes away without waiting for it (it would have died with it)."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def become_job(job, request: dict, fds: list[int], conn: socket.socket, inherited: list[socket.socket],
               inherited_fds: list[int]) -> None:
    """In the forked child: take the job's streams, directory, environment and arguments, run it, and exit."""
    code = 1
    interrupted = False
    try:
        for other in inherited:
            other.close()
        for fd in inherited_fds:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, *FORWARDED):  # the handlers a process starts with
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        os.setpgrp()  # signals reach the job through its waiting process only, not twice from a terminal
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # the job's TMPDIR, not the one the server may have looked up
        print(FORKED_LINE, file=sys.stderr, flush=True)  # its CPU-s exclude the imports (bench/demo_cost.py)
        sys.argv = list(request["argv"])
        threading.Thread(target=die_with_caller, args=(conn,), daemon=True).start()
        code = job(request["argv"][1:])
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:  # noqa: BLE001  (the job's traceback, as the interpreter would print it)
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            if interrupted:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            os._exit(code)


# -- the server ------------------------------------------------------------------------------------------------------

def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _flags, _addr = socket.recv_fds(conn, HEADER, 3)
    size, body = int.from_bytes(header, "big"), bytearray()
    while len(body) < size:
        chunk = conn.recv(min(1 << 16, size - len(body)))
        if not chunk:
            raise ConnectionError("the job's request ended early")
        body += chunk
    return json.loads(body), fds


def preload(modules: tuple[str, ...], job: str):
    """Import `modules` and return the function `job` ("module:function") and the CPU-seconds it all took."""
    import gc
    import importlib

    start = time.process_time()
    for name in modules:
        importlib.import_module(name)
    module, _, function = job.partition(":")
    run_job = getattr(importlib.import_module(module), function)
    gc.collect()
    gc.freeze()  # what was imported stays out of the forks' collections (and their pages shared)
    return run_job, time.process_time() - start


def serve(path: Path, log: Path | None, job: str = JOB, modules: tuple[str, ...] = PRELOAD) -> None:
    """Load `modules`, listen on `path`, and fork a job running `job` (given the job's arguments) for each request
    until SIGTERM; then wait for the running jobs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's interrupt is for the workflow, which stops the jobs
    me = identity()
    job, loaded = preload(modules, job)  # a workflow that ends first (nothing to run) kills the server here
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))  # after loading: a job arriving earlier finds no server and runs on its own
    listener.listen(64)
    jobs: dict[int, socket.socket] = {}
    served = refused = 0
    children_cpu = 0.0

    def reap(block: bool) -> None:
        nonlocal children_cpu
        while jobs:
            pid, status, usage = os.wait4(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return
            children_cpu += usage.ru_utime + usage.ru_stime
            conn = jobs.pop(pid, None)
            if conn is not None:
                with conn:
                    try:
                        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                    except OSError:
                        pass  # its waiting process is gone

    try:
        while not stopping.is_set():
            ready, _, _ = select.select([listener, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
            reap(block=False)
            if listener not in ready:
                continue
            conn, _ = listener.accept()
            try:
                request, fds = receive(conn)
            except (OSError, ValueError) as err:
                print(f"fork server: a bad request ({err})", file=sys.stderr)
                conn.close()
                continue
            reason = refusal(me, request)
            if reason is not None:
                refused += 1
                for fd in fds:
                    os.close(fd)
                with conn:
                    conn.sendall(json.dumps({"refused": reason}).encode() + b"\n")
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                become_job(job, request, fds, conn, [listener, *jobs.values()], [wake_r, wake_w])
            for fd in fds:
                os.close(fd)
            jobs[pid] = conn
            served += 1
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:
                os.kill(pid, signal.SIGKILL)  # its waiting process is gone
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        reap(block=True)
        line = SERVED_LINE.format(loaded=loaded, served=served, cpu=children_cpu, refused=refused)
        sys.stderr.write(line)
        if log is not None and served:  # appended: one line per workflow run that ran jobs
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as out:
                out.write(line)


def run(command: list[str], log: Path | None) -> int:
    """Run `command` with a fork server beside it; returns the command's exit code."""
    folder = Path(tempfile.mkdtemp(prefix="dinorankclip-forkserver-"))
    path = folder / "socket"
    server_env = os.environ | {key: SERVER_THREADS for key in IMPORT_TIME_ENV if key != "PYTHONHASHSEED"}
    server = subprocess.Popen([sys.executable, "-m", "dinorankclip.forkserver", "serve", str(path),
                               *(["--log", str(log)] if log else [])], env=server_env)
    try:
        with subprocess.Popen(command, env=os.environ | {ENV: str(path)}) as workflow:
            while True:
                try:
                    return workflow.wait()
                except KeyboardInterrupt:  # the workflow got it too and stops its jobs; wait for it
                    continue
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dinorankclip.forkserver", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("serve", help="serve jobs on SOCKET until SIGTERM")
    s.add_argument("socket", type=Path)
    s.add_argument("--log", type=Path, help="file for the server's closing line (what it cost, how many jobs)")
    s.add_argument("--job", default=JOB, help="the function a fork runs, as module:function (default: %(default)s)")
    s.add_argument("--preload", action="append", metavar="MODULE",
                   help="module to import before serving, given once per module (default: every stage's modules)")
    r = sub.add_parser("run", help="run COMMAND with a fork server beside it")
    r.add_argument("--log", type=Path, help="file for the server's closing line (what it cost, how many jobs)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.action == "serve":
        serve(args.socket, args.log, args.job, tuple(args.preload) if args.preload else PRELOAD)
        sys.stderr.flush()
        os._exit(0)  # the interpreter's teardown of what was loaded costs seconds and prints binding-leak notices
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("run: no command given")
    return run(command, args.log)


if __name__ == "__main__":
    sys.exit(main())
