"""Processes that end when the process that started them is gone, even when it was killed.

A process killed with SIGKILL (``kill -9``, the kernel's out-of-memory killer) runs no cleanup,
so whatever it started runs on: a ``loso``'s fold workers and private ``mlflow server``, a
``nested`` run's LOSO process. Each of those watches its parent here instead, by polling
``os.getppid()`` (a process whose parent dies is handed to another, so the value changes; this
works on every POSIX system, where ``prctl(PR_SET_PDEATHSIG)`` is Linux only):

- a process started with :data:`PARENT_ENV` set to its parent's pid (``nested`` starting a
  ``loso``) stops as on SIGTERM once that parent is gone (:func:`watch_parent_from_env`, called by
  every entry point): its ``finally`` blocks stop its own workers and server, and its run ends
  FAILED;
- a fold worker exits (:func:`watch_parent` with :func:`os._exit`): its folds were its parent's;
- a tracking server runs under a guard (:func:`guarded`, ``python -m ecg_mlflow.lifetime``): the
  guard starts the server in a process group of its own and ends that whole group, server and its
  workers, when it is stopped or the process that started it is gone.

What a killed process leaves in the tracking store is told apart here too: a run tagged with
:func:`process_token` (host, pid and the process's start time) can later be asked
:func:`process_alive`, so a RUNNING run whose process is gone is not mistaken for one at work.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PARENT_ENV = "ECG_MLFLOW_PARENT_PID"
POLL_S = 0.5  # how soon a child notices its parent is gone
GRACE_S = 10.0  # how long a guarded group may take to stop on SIGTERM before it is killed


def watch_parent(parent: int, on_orphan: Callable[[], object], interval: float = POLL_S) -> threading.Thread:
    """Call ``on_orphan()`` from a daemon thread once this process's parent is no longer ``parent``
    (at once if it is not now)."""

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_orphan()

    thread = threading.Thread(target=loop, name="watch-parent", daemon=True)
    thread.start()
    return thread


def interrupt_self() -> None:
    """Stop this process as SIGTERM does (an entry point turns it into ``KeyboardInterrupt``)."""
    os.kill(os.getpid(), signal.SIGTERM)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) for a child that should stop when this process is gone."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def watch_parent_from_env() -> bool:
    """Where :data:`PARENT_ENV` names this process's parent, stop as on SIGTERM once the parent is
    gone. The variable is removed, so this process's own children do not watch the wrong process.
    Returns whether a watch was started."""
    value = os.environ.pop(PARENT_ENV, "").strip()
    if not value.isdigit():
        return False
    watch_parent(int(value), interrupt_self)
    return True


def _stat(pid: int) -> tuple[str, str]:
    """Process ``pid``'s state letter and start time (clock ticks since boot) from Linux ``/proc``;
    ``("", "")`` where they cannot be read. Together with the pid the start time names one
    process: a pid is reused, a (pid, start) pair is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "", ""
    # Fields 3 and 22; the command name (field 2) is in parentheses and may hold spaces, so count from its end.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (fields[0].decode(), fields[19].decode()) if len(fields) > 19 else ("", "")


def host_id() -> str:
    """This host as pids are meaningful on it: the host name, and (Linux) a digest of the boot id and
    the pid namespace. Machines given the same name, or containers with pid namespaces of their own,
    thus differ, and none reads another's pid as its own."""
    name = socket.gethostname()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return name
    return f"{name}/{hashlib.sha256(f'{boot} {namespace}'.encode()).hexdigest()[:12]}"


def process_token(pid: int | None = None) -> str:
    """``"<host id> <pid> <start>"`` naming this process (or ``pid``), for a run's tag."""
    pid = os.getpid() if pid is None else pid
    return f"{host_id()} {pid} {_stat(pid)[1]}".rstrip()


def process_alive(token: str) -> bool | None:
    """Whether the process a :func:`process_token` names still runs: ``None`` when it ran on another
    host (or the token cannot be read), so nobody here can tell."""
    parts = token.split()
    if len(parts) not in (2, 3) or not parts[1].isdigit() or parts[0] != host_id() \
            or os.name != "posix":  # elsewhere os.kill(pid, 0) would end the process
        return None
    pid = int(parts[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    state, start = _stat(pid)
    if state == "Z":
        return False  # it has ended; only its exit status waits to be collected
    if len(parts) == 3 and start and start != parts[2]:
        return False  # the pid now belongs to a later process
    return True


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` run under a guard (:func:`main`) that ends the command's process group once this
    process is gone; SIGTERM to the guard ends that group too."""
    return [sys.executable, "-m", "ecg_mlflow.lifetime", str(os.getpid()), "--", *cmd]


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal n: 128 + n, as a shell reports it


def _end_group(proc: subprocess.Popen) -> int:
    """SIGTERM to ``proc``'s process group; once the group is empty, or after :data:`GRACE_S`,
    SIGKILL to what is left. Returns ``proc``'s exit status."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        proc.poll()  # reap it, or its zombie keeps the group alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break  # every process of the group has ended
        time.sleep(0.1)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return _exit_status(proc.wait())


def main(argv: list[str] | None = None) -> int:
    """The guard: ``python -m ecg_mlflow.lifetime PARENT_PID -- CMD ...``. Runs CMD in a process
    group of its own and returns its exit status. When PARENT_PID is no longer the guard's parent,
    or on SIGTERM / SIGINT, it ends that group (:func:`_end_group`); when CMD ends by itself, what
    CMD left of its group is killed."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m ecg_mlflow.lifetime PARENT_PID -- CMD ...", file=sys.stderr)
        return 2
    parent, cmd = int(argv[0]), argv[2:]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if os.getppid() != parent:  # the parent went before the guard started: start nothing
        return 1
    proc = subprocess.Popen(cmd, start_new_session=True)
    while not stop.is_set() and os.getppid() == parent:
        try:
            code = _exit_status(proc.wait(timeout=POLL_S))
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers the command left behind
        except ProcessLookupError:
            pass
        return code
    return _end_group(proc)


if __name__ == "__main__":
    sys.exit(main())
