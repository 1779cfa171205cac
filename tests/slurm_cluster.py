"""A one-node SLURM cluster (munged, slurmctld, slurmd) in a temp dir, for tests.

Debian's slurm-wlm runs without systemd when every path (state, spool, logs, pid files,
the munge socket) lives in one directory; `.ci/run` installs the packages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=polymodal-ci
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

DAEMONS = ("slurmctld", "slurmd", "munged")


def missing_binaries() -> list[str]:
    names = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")
    return [n for n in names if subprocess.run(["which", n], capture_output=True).returncode]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """Start with `start()`, stop with `stop()` (kills the daemons by their pid files)."""

    def __init__(self, root: Path) -> None:
        """`root` and its parents must be readable by the munge user (not a 0700 dir)."""
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(args)} failed: {out.stderr or out.stdout}")
        return out.stdout

    def start(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "munge:munge", str(self.root / "munge")], check=True)
        self.root.chmod(0o755)
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                root=self.root,
                cpus=os.cpu_count(),
                ctld_port=free_port(),
                d_port=free_port(),
            )
        )
        munge = self.root / "munge"
        subprocess.run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "munged",
                f"--socket={munge}/munge.socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ],
            check=True,
        )
        self.run("slurmctld", "-f", str(self.conf))
        self.run("slurmd", "-f", str(self.conf))
        deadline = time.monotonic() + 60
        while "idle" not in self.run("sinfo", "-h", "-o", "%t", check=False):
            if time.monotonic() > deadline:
                raise RuntimeError(f"slurm did not come up: {self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))

    def stop(self, timeout: float = 60) -> None:
        """Cancel what is left and wait until the queue is empty (a finished job stays
        COMPLETING until its srun and slurmstepd are done; killing the daemons before that
        leaves them waiting forever), then stop the daemons."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
        if jobs:
            self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i", check=False).strip():
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        pid_files = [self.root / "slurmd.pid", self.root / "slurmctld.pid"]
        pid_files.append(self.root / "munge" / "munged.pid")
        for pid_file in pid_files:
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False)
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"
