"""A one-node SLURM cluster on 127.0.0.1 for the tests (and for trying `snakemake --profile slurm` by hand).

    python tests/slurm_cluster.py start [--partitions slurm/partitions.yaml]   # installs slurm-wlm/munge if missing
    python tests/slurm_cluster.py stop                                          # stops exactly what start started
    python tests/slurm_cluster.py status
    export SLURM_CONF=$TMPDIR/dinorankclip-slurm/slurm.conf                     # for sinfo, squeue, sbatch by hand

munged, slurmctld and slurmd (Debian's slurm-wlm 22.05) run as root with every file, socket and port of their own
under the state folder (`SLURM_CLUSTER_DIR`, default `$TMPDIR/dinorankclip-slurm`), so a system SLURM or munge is
neither used nor touched, and `stop` signals only the PIDs in that folder's pid files. No accounting storage:
`sacct` cannot answer, so Snakemake's plugin must poll with `slurm-status-command: squeue`.

Inside a job, Snakemake's jobstep plugin clears every SLURM_* variable but the job's ids, SLURM_CONF included
(snakemake-executor-plugin-slurm issues 164 and 334), so its `srun` finds the configuration only at the default
path: `start` links /etc/slurm/slurm.conf to this cluster's file (refusing if a real one is there), `stop` unlinks it.

The cluster is shaped like the profile's partitions file: one partition per entry, and one node advertising the
largest memory, CPU and GPU counts listed there, so the workflow profile's paper-scale requests (`--mem`,
`--cpus-per-task`, `--gpus`, `-A`) go through sbatch unchanged. The node's memory and CPUs are declared, not
enforced (`config_overrides`, no task affinity), and its GPUs are placeholder device files (aliases of /dev/null):
a job gets `CUDA_VISIBLE_DEVICES`, torch finds no CUDA driver and runs on the CPU.

`Cluster(nodes=multi_node_names())` runs one slurmd per node name on this host (Debian's slurmd runs several,
each started with `-N <node>` and listening on its own port), so a multi-node job really spans two nodes and
srun starts one task on each.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the daemons live in sbin, which a non-login PATH (CI's, cron's) may lack
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
PORTS = (6917, 6918)  # slurmctld, slurmd: off SLURM's defaults (6817/6818), so a system SLURM keeps its ports
STOP_WAIT_S = 15
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")


class ClusterError(RuntimeError):
    pass


def state_dir() -> Path:
    return Path(os.environ.get("SLURM_CLUSTER_DIR") or Path(tempfile.gettempdir()) / "dinorankclip-slurm")


class Cluster:
    def __init__(self, root: Path | None = None, nodes: tuple[str, ...] = ("localhost",),
                 ports: tuple[int, int] = PORTS) -> None:
        self.root = Path(root or state_dir())
        self.conf = self.root / "slurm.conf"
        self.run = self.root / "run"  # pid files and the munge socket (must be world-executable for munge)
        self.log = self.root / "log"
        self.nodes, self.ports = tuple(nodes), ports
        # one slurmd per node, its pid file named by SlurmdPidFile's %n when there are several
        self.daemons = ("munged", "slurmctld", *(("slurmd",) if len(self.nodes) == 1 else
                                                 (f"slurmd-{node}" for node in self.nodes)))

    def env(self) -> dict[str, str]:
        """What SLURM's commands (sbatch, squeue, srun inside jobs) need to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def pid(self, daemon: str) -> int | None:
        """The daemon's PID if its pid file names a live process of that program (a reused PID is not ours)."""
        try:
            pid = int((self.run / f"{daemon}.pid").read_text().split()[0])
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ValueError, IndexError):
            return None
        name = status.split("\n", 1)[0].split()[-1]
        zombie = any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())
        return None if zombie or name != daemon.split("-", 1)[0] else pid

    def running(self) -> dict[str, int | None]:
        return {daemon: self.pid(daemon) for daemon in self.daemons}

    def start(self, partitions: Path | None = REPO / "slurm" / "partitions.yaml") -> None:
        """Start whatever is not running yet; a no-op when the whole cluster is up."""
        if all(self.running().values()):
            return
        install()
        if not any(self.running().values()):
            shutil.rmtree(self.root, ignore_errors=True)
        for path in (self.root, self.run, self.log, self.root / "munge", self.root / "state"):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.run, 0o755)
        os.chmod(self.root / "munge", 0o700)
        self._write_config(partitions)
        self._link_default_conf()
        env = {**os.environ, **self.env()}
        if not self.pid("munged"):
            key = self.root / "munge" / "munge.key"
            if not key.exists():
                key.write_bytes(os.urandom(1024))
                key.chmod(0o600)
            self._daemon(["munged", f"--socket={self.run / 'munge.sock'}", f"--key-file={key}",
                          f"--pid-file={self.run / 'munged.pid'}", f"--log-file={self.log / 'munged.log'}",
                          f"--seed-file={self.root / 'munge' / 'seed'}"], env)
        if not self.pid("slurmctld"):
            self._daemon(["slurmctld", "-c", "-f", str(self.conf)], env)  # -c: no jobs from an earlier cluster
        for node, daemon in zip(self.nodes, self.daemons[2:], strict=True):
            if not self.pid(daemon):
                self._daemon(["slurmd", "-N", node, "-f", str(self.conf)], env, daemon)
        self._wait("every node to become idle", lambda: self._node_states(env) == dict.fromkeys(self.nodes, "idle"))
        smoke = subprocess.run(["srun", "-Q", "-t", "1", "true"], env=env, capture_output=True, text=True, timeout=60)
        if smoke.returncode:
            raise ClusterError(f"`srun true` failed on the new cluster: {smoke.stderr.strip()} (logs: {self.log})")

    def _node_states(self, env: dict) -> dict[str, str]:
        """{node: state}; sinfo lists a node once per partition."""
        return dict(line.split() for line in _out(["sinfo", "-h", "-N", "-o", "%N %t"], env).splitlines() if line)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then SIGTERM (SIGKILL after 15 s) each daemon named by our pid files."""
        env = {**os.environ, **self.env()}
        if self.pid("slurmctld"):
            subprocess.run(["scancel", "--user", str(os.getuid())], env=env, capture_output=True, timeout=30)
            self._wait("cancelled jobs to end", lambda: not _out(["squeue", "-h"], env).strip(), STOP_WAIT_S, False)
        for daemon in reversed(self.daemons):
            pid = self.pid(daemon)
            if pid:
                since = started(pid)
                # wait for the process, not its pid file: munged removes the file before it has exited
                def exited(p=pid, s=since):
                    return started(p) != s
                os.kill(pid, signal.SIGTERM)
                if not self._wait(f"{daemon} to exit", exited, STOP_WAIT_S, False):
                    os.kill(pid, signal.SIGKILL)
                    self._wait(f"{daemon} to die", exited, STOP_WAIT_S)
            (self.run / f"{daemon}.pid").unlink(missing_ok=True)
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.readlink() == self.conf:
            DEFAULT_CONF.unlink()

    def _link_default_conf(self) -> None:
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.readlink() == self.conf:
            return
        if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
            raise ClusterError(f"{DEFAULT_CONF} exists and is not this test cluster's: jobs of the test cluster would "
                               "read it (the jobstep plugin drops SLURM_CONF); move it away to run the SLURM tests")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(self.conf)

    def _write_config(self, partitions: Path | None) -> None:
        import yaml

        parts = yaml.safe_load(partitions.read_text())["partitions"] if partitions else {}
        parts = parts or {"debug": {}}
        gpus = max(int(p.get("max_gpu", 0)) for p in parts.values())
        memory = max([int(p.get("max_mem_mb", 0)) for p in parts.values()] + [physical_memory_mb()])
        cpus = max([int(p.get("max_threads", 0)) for p in parts.values()] + [os.cpu_count()])
        gres = ""
        if gpus:
            lines = ["AutoDetect=off"]
            for node in self.nodes:
                devices = self.root / "dev" / node
                devices.mkdir(parents=True, exist_ok=True)
                for i in range(gpus):
                    if not (devices / f"gpu{i}").exists():
                        os.mknod(devices / f"gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
                lines.append(f"NodeName={node} Name=gpu File={devices}/gpu[0-{gpus - 1}]")
            (self.root / "gres.conf").write_text("\n".join(lines) + "\n")
            gres = f" Gres=gpu:{gpus}"
        several = len(self.nodes) > 1  # then each slurmd has its own port, pid file, spool and log (%n: its node)
        suffix = "-%n" if several else ""
        lines = [
            "ClusterName=dinorankclip-ci", "SlurmctldHost=localhost", "SlurmUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.run / 'munge.sock'}",
            f"SlurmctldPort={self.ports[0]}", f"SlurmdPort={self.ports[1]}",
            f"StateSaveLocation={self.root / 'state' / 'ctld'}", f"SlurmdSpoolDir={self.root / 'state' / 'd'}{suffix}",
            f"SlurmctldPidFile={self.run / 'slurmctld.pid'}", f"SlurmdPidFile={self.run / 'slurmd'}{suffix}.pid",
            f"SlurmctldLogFile={self.log / 'slurmctld.log'}", f"SlurmdLogFile={self.log / 'slurmd'}{suffix}.log",
            "MailProg=/bin/true", "MpiDefault=none",
            # no cgroups or systemd here: processes tracked by parentage, nothing confined
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "SchedulerParameters=batch_sched_delay=0",  # start batch jobs at once (default: up to 3 s later)
            "SlurmdParameters=config_overrides",  # the node's declared memory counts, not the machine's
            "GresTypes=gpu" if gpus else "",
            "ReturnToService=2", "KillWait=5",
            # finished jobs stay visible to squeue for an hour: the plugin's squeue polling needs
            # MinJobAge >= 3 x its first poll delay, and the tests read the jobs back with scontrol
            "MinJobAge=3600",
        ]
        lines += [f"NodeName={node} NodeAddr=127.0.0.1"
                  + (f" NodeHostname=localhost Port={self.ports[1] + 1 + i}" if several else "")
                  + f" CPUs={cpus} RealMemory={memory}{gres} State=UNKNOWN" for i, node in enumerate(self.nodes)]
        lines += [f"PartitionName={name} Nodes={','.join(self.nodes)} Default={'YES' if i == 0 else 'NO'} "
                  "MaxTime=INFINITE State=UP" for i, name in enumerate(parts)]
        self.conf.write_text("\n".join(line for line in lines if line) + "\n")

    def _daemon(self, argv: list[str], env: dict, name: str | None = None) -> None:
        """Start a daemon that forks into the background and writes its own pid file (`name`.pid); wait for it."""
        name = name or argv[0]
        result = subprocess.run([program(argv[0]), *argv[1:]], env=env, capture_output=True, text=True, timeout=60)
        if result.returncode or not self._wait(f"{name} to start", lambda: self.pid(name), 20, False):
            raise ClusterError(f"{name} did not start (rc {result.returncode}): {result.stderr.strip()} "
                               f"(see {self.log / (name + '.log')})")

    def _wait(self, what: str, ready, timeout: float = 30, raise_on_timeout: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            time.sleep(0.2)
        if raise_on_timeout:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what} (logs: {self.log})")
        return False


def started(pid: int) -> str | None:
    """When process `pid` started (field 22 of /proc/<pid>/stat, clock ticks since boot); None if there is none or it
    is a zombie (exited, not yet reaped by a PID 1 that does not reap). A PID taken again names another start."""
    try:
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if state == "Z" else fields[18]


def multi_node_names() -> tuple[str, str] | None:
    """Names for two nodes on this host: its own name (which resolves here, so a job's tasks reach the first node
    by name, as on a real cluster) and that name with `-2`; None if the host's name does not resolve here. (SLURM
    maps a node called `localhost` to the host's name, so it cannot be one of several.)"""
    import socket

    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return None
    local = address.startswith("127.") or address in _own_addresses()
    return (host, f"{host}-2") if host != "localhost" and local else None


def _own_addresses() -> set[str]:
    result = subprocess.run(["hostname", "-I"], capture_output=True, text=True)
    return set(result.stdout.split())


def memory_mb(value: str) -> int:
    """A memory size as scontrol prints it (`64000M`, `62.50G`, `1T`) in MB."""
    factor = {"M": 1, "G": 1024, "T": 1024**2}[value[-1]]
    return round(float(value[:-1]) * factor)


def scontrol(cluster: Cluster, job: str) -> dict[str, str]:
    """What SLURM recorded of a job (`scontrol -o show job`), field by field: what sbatch received."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env={**os.environ, **cluster.env()},
                         capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def submissions(log: str) -> list[tuple[str, str]]:
    """(SLURM job id, rule) of every sbatch submission in Snakemake's log, in order."""
    return re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_([a-z_]+)/", log)


def _out(argv: list[str], env: dict) -> str:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    return result.stdout if result.returncode == 0 else ""


def physical_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def program(name: str) -> str:
    """The path of `name` on PATH or in the sbin folders (where Debian puts munged, slurmctld and slurmd)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN])) or name


def install() -> None:
    """Debian's slurm-wlm and munge, through apt, when their programs are missing (needs root)."""
    missing = [p for p in ("munged", "slurmctld", "slurmd", "sbatch", "squeue") if program(p) == p]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterError(f"{', '.join(missing)} not found; install slurm-wlm and munge (apt-get needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    if subprocess.run(install_cmd, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        result = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
        if result.returncode:
            raise ClusterError(f"apt-get install slurm-wlm munge failed: {result.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--partitions", type=Path, default=REPO / "slurm" / "partitions.yaml",
                   help="partitions file the cluster mirrors (default: slurm/partitions.yaml)")
    args = p.parse_args(argv)
    cluster = Cluster()
    try:
        if args.action == "start":
            cluster.start(args.partitions)
        elif args.action == "stop":
            cluster.stop()
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    running = cluster.running()
    print(" ".join(f"{d}={pid or '-'}" for d, pid in running.items()), f"SLURM_CONF={cluster.conf}")
    return 1 if args.action == "stop" and any(running.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
