"""The fork server that `make demo` runs beside Snakemake: a forked job behaves as the job run on its own would.

The end-to-end check is in test_demo_e2e.py: the demo is built under the server and two of its runs are rebuilt
without it, byte for byte. Here a light job (tests/_forkserver_job.py) stands in for the CLI.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from dinorankclip.forkserver import ENV, FORKED_LINE, IMPORT_TIME_ENV, identity, refusal

TESTS = Path(__file__).resolve().parent
ONE_THREAD = {key: "1" for key in IMPORT_TIME_ENV if key != "PYTHONHASHSEED"}
# the waiting process: exit code 100 when it was told to run the job itself
CALLER = ("import sys\nfrom dinorankclip.forkserver import delegate\n"
          "code = delegate(['prog'] + sys.argv[1:])\nsys.exit(100 if code is None else code)")


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in IMPORT_TIME_ENV}
    return env | ONE_THREAD | {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO / "src")])}


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path):
    """A server running tests/_forkserver_job.py's main; yields its socket path, then stops it and yields its log."""
    path, log = tmp_path / "socket", tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "dinorankclip.forkserver", "serve", str(path), "--log", str(log),
                             "--job", "_forkserver_job:main", "--preload", "_forkserver_job"], env=base_env())
    wait_for(path.exists, "the server's socket")
    state = {"path": path, "log": log, "proc": proc}
    yield state
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def caller(server, *args, cwd, env=None, stdout=None, stderr=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CALLER, *args], cwd=cwd,
                            env=base_env() | {ENV: str(server["path"])} | (env or {}),
                            stdout=stdout or subprocess.PIPE, stderr=stderr or subprocess.PIPE, text=True)


def test_a_forked_job_gets_the_callers_arguments_directory_environment_streams_and_exit_code(server, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = caller(server, "echo", "7", cwd=work, env={"COLOUR": "teal"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7
    seen = json.loads(out)
    assert seen == {"argv": ["echo", "7"], "cwd": str(work), "colour": "teal", "executable_argv": ["prog", "echo", "7"]}
    assert err == FORKED_LINE + "\nto stderr\n"  # the job's log says it was forked (bench/demo_cost.py reads it)
    # a second job is a fresh fork: nothing of the first one's environment
    proc = caller(server, "echo", "0", cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and json.loads(out)["colour"] is None and json.loads(out)["cwd"] == str(tmp_path)
    server["proc"].terminate()
    assert server["proc"].wait(timeout=60) == 0
    assert "ran 2 jobs" in server["log"].read_text() and "0 ran on their own" in server["log"].read_text()
    assert not server["path"].exists()


def test_a_job_that_raises_prints_its_traceback_and_exits_1(server, tmp_path):
    proc = caller(server, "no-such-action", cwd=tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "RuntimeError: unknown action no-such-action" in err


@pytest.mark.parametrize("key", ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"])
def test_a_job_with_other_thread_settings_than_the_server_loaded_with_runs_on_its_own(server, tmp_path, key):
    proc = caller(server, "echo", "0", cwd=tmp_path, env={key: "2"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 100 and out == "" and key in err


def test_without_a_server_a_job_runs_on_its_own(tmp_path):
    for env in ({}, {ENV: str(tmp_path / "no-socket")}):
        proc = subprocess.run([sys.executable, "-c", CALLER, "echo", "0"], env=base_env() | env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 100 and proc.stdout == ""


def test_refusal_names_what_differs():
    me = identity()
    assert refusal(me, me) is None
    assert "package" in refusal(me, me | {"package": "/elsewhere/dinorankclip"})
    other = me | {"import_env": me["import_env"] | {"MKL_NUM_THREADS": "4"}}
    assert "MKL_NUM_THREADS" in refusal(me, other)


def started_job(server, tmp_path) -> tuple[subprocess.Popen, int]:
    out = tmp_path / "out.txt"
    proc = caller(server, "wait", cwd=tmp_path, stdout=out.open("w"))
    wait_for(lambda: out.read_text().strip(), "the job to start")
    return proc, int(out.read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_signal_to_the_waiting_process_reaches_the_job(server, tmp_path):
    proc, job = started_job(server, tmp_path)
    proc.send_signal(signal.SIGTERM)  # the job handles it and exits 3, as a preempted training exits with its status
    assert proc.wait(timeout=60) == 3
    wait_for(lambda: gone(job), "the job to be reaped")


def test_a_job_killed_by_a_signal_kills_its_waiting_process_with_the_same_signal(server, tmp_path):
    proc = caller(server, "kill", cwd=tmp_path)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_when_the_waiting_process_dies_the_job_dies_too(server, tmp_path):
    proc, job = started_job(server, tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    wait_for(lambda: gone(job), "the orphaned job to be killed")


def test_the_real_cli_forked_prints_what_it_prints_on_its_own(tmp_path):
    """The default job (the CLI) with only its own module loaded: `check` forked and alone give the same output."""
    path, log = tmp_path / "socket", tmp_path / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "dinorankclip.forkserver", "serve", str(path), "--log", str(log),
                               "--preload", "dinorankclip.cli"], env=base_env(), cwd=REPO)
    try:
        wait_for(path.exists, "the server's socket")
        command = [sys.executable, "-m", "dinorankclip", "--study", "demo", "check"]
        alone = subprocess.run(command, env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
        forked = subprocess.run(command, env=base_env() | {ENV: str(path)}, cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        bad = subprocess.run(command[:3] + ["--study", "no-such-study", "check"], env=base_env() | {ENV: str(path)},
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "ran 2 jobs" in log.read_text() and "0 ran on their own" in log.read_text()
    assert alone.returncode == forked.returncode == 0 and "26 (run, seed)" in alone.stdout
    assert forked.stdout == alone.stdout
    assert bad.returncode == 2 and "no-such-study" in bad.stderr


def test_run_starts_a_server_beside_the_command_and_stops_it(tmp_path):
    log = tmp_path / "server.log"
    script = (f"import os, time\nwhile not os.path.exists(os.environ['{ENV}']): time.sleep(0.05)\n"
              "print(os.environ['" + ENV + "'])\nraise SystemExit(5)")
    proc = subprocess.run([sys.executable, "-m", "dinorankclip.forkserver", "run", "--log", str(log), "--",
                           sys.executable, "-c", script], env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stderr
    socket_path = Path(proc.stdout.strip())
    assert not socket_path.parent.exists()  # its folder removed
    assert not log.exists()  # it ran no job: nothing to record
