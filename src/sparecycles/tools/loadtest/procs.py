"""Processes of a load test: starting fake-node and client processes, and reading a process's
CPU time and memory from /proc (Linux) without extra dependencies."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float  # user + system CPU seconds so far
    rss_bytes: int


def proc_sample(pid: int) -> ProcSample | None:
    """CPU seconds and resident memory of ``pid`` (None when it is gone or not on Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return ProcSample(cpu_s, rss)


def _prepare_child(cpus: set[int] | None) -> None:
    """In the child before exec: the open-file limit raised, and the CPUs it may run on."""
    _raise_nofile()
    if cpus:
        os.sched_setaffinity(0, cpus)


def _raise_nofile() -> None:
    """In the child before exec: open-file limit up to the hard limit (a socket per node)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None,
          cpus: set[int] | None = None, python: str = "") -> subprocess.Popen[bytes]:
    """``python -m sparecycles ARGS`` in its own session, output to ``log_path``, with the
    open-file limit raised to the hard limit; on ``cpus`` only when given (its threads too),
    with ``python`` when given (another interpreter), else this one."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 - the child process owns it
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([python or sys.executable, "-m", "sparecycles", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
                            preexec_fn=functools.partial(_prepare_child, cpus))
    out.close()
    return proc


def stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 15.0) -> None:
    """SIGTERM each process group, then SIGKILL what is still running after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
