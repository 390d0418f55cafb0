"""A real SLURM on this host for tests: Debian's `slurm-wlm` and `munge` (installed with apt when missing),
one slurmctld and two slurmd daemons acting as two nodes, all started by the test, configured in a
directory of their own (SLURM_CONF points the clients there; /etc/slurm is never read or written), and
stopped again: only the processes it started, after the jobs it submitted are gone.

Needs root (the daemons, apt, the two node names in /etc/hosts) and apt where SLURM is not installed.
`unavailable()` says why a test cannot run here; under CI (CI=true) the test fails instead of skipping.

The configuration suits a container without systemd or cgroups: process tracking by /proc
(proctrack/linuxproc), no task plugin, no accounting; each node has 2 CPUs whatever the host has
(config_overrides). `cred_expire=10` shortens how long a requeued job waits before it may start again
(slurm.conf AuthInfo: 120 s by default; the only wait in a requeue test).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = ("vggtnode1", "vggtnode2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
HOSTS = Path("/etc/hosts")
REQUEUE_WAIT_S = 10  # cred_expire below


def unavailable() -> str | None:
    """Why a real SLURM cannot be started here, or None."""
    if os.geteuid() != 0:
        return "a real SLURM needs root (its daemons, apt, /etc/hosts)"
    if not all(map(shutil.which, DAEMONS)) and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
    return None


def install() -> None:
    if all(map(shutil.which, DAEMONS)):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(what: str, condition, timeout: float, every: float = 0.5):
    """Poll `condition()` until it returns something truthy (returned); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Cluster:
    """Start with `start()`, stop with `stop()`; `run(...)` runs a SLURM client against it."""

    def __init__(self):
        # Not under pytest's tmp_path (0700, root's): munged runs as user munge and must reach its files.
        self.dir = Path(tempfile.mkdtemp(prefix="vggt-slurm-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.hosts_added: list[str] = []

    def start(self) -> None:
        self._add_hosts()
        munge = self.dir / "munge"
        munge.mkdir(mode=0o755)
        shutil.chown(munge, "munge", "munge")
        key = munge / "munge.key"
        self._check(["runuser", "-u", "munge", "--", "mungekey", "--create", "--keyfile", str(key)])
        socket_path = munge / "munge.socket"
        self._daemon("munged", ["runuser", "-u", "munge", "--", "munged", "--foreground", f"--socket={socket_path}",
                                f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
                                f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        wait_for("munged's socket", socket_path.exists, 30)
        self._write_conf(socket_path)
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in NODES:
            self._daemon(f"slurmd {node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        wait_for("both nodes idle", lambda: self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
                 .stdout.split() == [NODES[0], "idle", NODES[1], "idle"], 60)

    def _write_conf(self, munge_socket: Path) -> None:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        lines = [
            "ClusterName=vggttest", "SlurmctldHost=localhost", f"SlurmctldPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket},cred_expire={REQUEUE_WAIT_S}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.dir / 'state'}", f"SlurmdSpoolDir={self.dir / 'spool'}/%n",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}", f"SlurmdPidFile={self.dir / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.dir / 'slurmctld.log'}", f"SlurmdLogFile={self.dir / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SwitchType=switch/none",
            "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "SchedulerParameters=sched_interval=2",
        ]
        lines += [f"NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 Port={_free_port()} CPUs=2 State=UNKNOWN"
                  for node in NODES]
        lines.append("PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _add_hosts(self) -> None:
        known = HOSTS.read_text()
        for node in NODES:
            try:
                socket.gethostbyname(node)
            except OSError:
                self.hosts_added.append(f"127.0.0.1 {node}  # vggt-fsdp SLURM test")
        if self.hosts_added:
            HOSTS.write_text(known + ("" if known.endswith("\n") else "\n") + "\n".join(self.hosts_added) + "\n")

    def _daemon(self, name: str, command: list[str]) -> None:
        log = open(self.dir / f"{name.replace(' ', '-')}.out", "w")
        self.daemons.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True)))
        time.sleep(0.2)
        if self.daemons[-1][1].poll() is not None:
            raise AssertionError(f"{name} exited at once:\n{self.logs()}")

    def _check(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"

    def run(self, *command: str, check: bool = True, cwd: Path | None = None, timeout: float = 60):
        result = subprocess.run(command, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ...); {} once the job is gone."""
        result = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if result.returncode != 0:
            return {}
        return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")))

    def stop(self) -> None:
        """Cancel every job still there, then stop the daemons this cluster started and undo its /etc/hosts lines."""
        try:
            if any(name == "slurmctld" for name, proc in self.daemons if proc.poll() is None):
                self.run("scancel", "--full", "--signal=KILL", "--partition=test", check=False)
                self.run("scancel", "--partition=test", check=False)
                wait_for("the test's jobs to end", lambda: not self.run("squeue", "-h", check=False).stdout.strip(),
                         60)
        finally:
            for name, proc in reversed(self.daemons):
                if proc.poll() is None:
                    os.killpg(proc.pid, 15)
            for name, proc in reversed(self.daemons):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
            if self.hosts_added:
                lines = HOSTS.read_text().splitlines()
                HOSTS.write_text("".join(line + "\n" for line in lines if line not in self.hosts_added))
            shutil.rmtree(self.dir, ignore_errors=True)
