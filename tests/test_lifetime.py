"""Processes that end with the process that started them, even when it is killed with SIGKILL.

Real processes throughout: a parent process is started, it starts the guarded command or the
watching child, the parent is killed, and the test waits for what it left to end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ecg_mlflow import lifetime

REPO = Path(__file__).resolve().parents[1]
# The command a guard runs: writes its pid and a background child's pid (both in its process group).
GROUP_CMD = 'echo $$ > cmd.pid; sleep 300 & echo $! > bg.pid; {tail}'


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def read_pids(cwd: Path, *names: str) -> list[int]:
    wait_until(lambda: all((cwd / n).exists() and (cwd / n).read_text().strip() for n in names), 30,
               f"{names} to be written")
    return [int((cwd / n).read_text()) for n in names]


pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")


def test_a_guarded_group_ends_when_its_parent_is_killed(tmp_path):
    parent_code = (
        "import subprocess, sys, time\n"
        "from ecg_mlflow.lifetime import guarded\n"
        f"p = subprocess.Popen(guarded(['bash', '-c', {GROUP_CMD.format(tail='wait')!r}]), start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        guard = int(parent.stdout.readline())
        cmd, bg = read_pids(tmp_path, "cmd.pid", "bg.pid")
        time.sleep(2 * lifetime.POLL_S)
        assert all(alive(p) for p in (guard, cmd, bg))  # nothing ends while the parent lives
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: not any(alive(p) for p in (guard, cmd, bg)), 20, "the guard and its group to end")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_sigterm_to_the_guard_ends_the_group_and_the_guard(tmp_path):
    guard = subprocess.Popen(lifetime.guarded(["bash", "-c", GROUP_CMD.format(tail="wait")]), cwd=tmp_path,
                             env=env(), start_new_session=True)
    try:
        cmd, bg = read_pids(tmp_path, "cmd.pid", "bg.pid")
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=20) == 128 + signal.SIGTERM  # bash ended by the SIGTERM the guard sent
        wait_until(lambda: not alive(cmd) and not alive(bg), 10, "the group to end")
    finally:
        if guard.poll() is None:
            guard.kill()


def test_a_command_deaf_to_sigterm_is_killed_after_the_grace(tmp_path):
    guard = subprocess.Popen(lifetime.guarded(["bash", "-c", "trap '' TERM; " + GROUP_CMD.format(tail="wait")]),
                             cwd=tmp_path, env=env(), start_new_session=True)
    try:
        cmd, bg = read_pids(tmp_path, "cmd.pid", "bg.pid")
        start = time.monotonic()
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=lifetime.GRACE_S + 20) == 128 + signal.SIGKILL
        assert time.monotonic() - start >= lifetime.GRACE_S - 1  # it was given the grace first
        wait_until(lambda: not alive(cmd) and not alive(bg), 10, "the group to end")
    finally:
        if guard.poll() is None:
            guard.kill()


def test_the_guard_returns_the_commands_status_and_ends_what_it_left(tmp_path):
    guard = subprocess.run(lifetime.guarded(["bash", "-c", GROUP_CMD.format(tail="exit 3")]), cwd=tmp_path,
                           env=env(), start_new_session=True, timeout=60)
    assert guard.returncode == 3
    (bg,) = read_pids(tmp_path, "bg.pid")
    wait_until(lambda: not alive(bg), 10, "the background child to end")


def test_a_guard_whose_parent_is_gone_starts_nothing_and_bad_usage_says_so(tmp_path):
    # Pid 1 is not its parent: as if the parent had gone before the guard started.
    done = subprocess.run([sys.executable, "-m", "ecg_mlflow.lifetime", "1", "--", "touch", "made"], cwd=tmp_path,
                          env=env(), timeout=60)
    assert done.returncode == 1 and not (tmp_path / "made").exists()
    bad = subprocess.run([sys.executable, "-m", "ecg_mlflow.lifetime", "touch", "made"], cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage: python -m ecg_mlflow.lifetime PARENT_PID -- CMD" in bad.stderr


def test_an_entry_point_whose_parent_is_killed_stops_as_on_sigterm(tmp_path):
    # The child: an entry point (cli.run_main) given a run it has not begun (as nested gives one),
    # that sleeps, cleans up in `finally`, and records what its own children would inherit.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("lifetime")).info.run_id
    child_code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from ecg_mlflow import cli, lifetime\n"
        "def main():\n"
        "    Path('inherited').write_text(os.environ.get(lifetime.PARENT_ENV, 'none'))\n"
        "    Path('child.pid').write_text(str(os.getpid()))\n"
        "    try:\n"
        "        time.sleep(300)\n"
        "    finally:\n"
        "        Path('cleaned').write_text('yes')\n"
        "cli.run_main(main)\n")
    parent_code = (
        "import subprocess, sys, time\n"
        "from ecg_mlflow import lifetime\n"
        f"subprocess.Popen([sys.executable, '-c', {child_code!r}], env=lifetime.child_env())\n"
        "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=tmp_path,
                              env={**env(), "MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id})
    try:
        (child,) = read_pids(tmp_path, "child.pid")
        assert (tmp_path / "inherited").read_text() == "none"  # not passed on to its own children
        time.sleep(2 * lifetime.POLL_S)
        assert alive(child) and not (tmp_path / "cleaned").exists()
        assert client.get_run(run_id).info.status == "RUNNING"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: not alive(child), 60, "the child to stop")
        assert (tmp_path / "cleaned").read_text() == "yes"  # its finally block ran
        assert client.get_run(run_id).info.status == "FAILED"  # no parent left to end it: the child did
    finally:
        if parent.poll() is None:
            parent.kill()


# --------------------------------------------------------------------------------------------
# which process runs a run: a RUNNING run whose process is gone is told from one at work


def test_a_process_token_names_one_process_while_it_runs():
    me = lifetime.process_token()
    host, pid, start = me.split()
    assert int(pid) == os.getpid() and start.isdigit() and lifetime.process_alive(me) is True
    child = subprocess.Popen(["sleep", "300"])
    try:
        token = lifetime.process_token(child.pid)
        assert lifetime.process_alive(token) is True
        child.kill()
        wait_until(lambda: not alive(child.pid), 10, "the child to end")
        assert lifetime.process_alive(token) is False  # ended, even before its exit status is collected
    finally:
        child.kill()
        child.wait()
    assert lifetime.process_alive(token) is False
    assert lifetime.process_alive(f"{host} {pid} {int(start) + 1}") is False  # the pid, but a later process
    assert lifetime.process_alive(f"{host}-elsewhere {pid} {start}") is None  # another host: cannot tell
    # a machine of the same name (another boot, another pid namespace) is another host too
    name = socket.gethostname()
    assert host.startswith(name + "/") and lifetime.process_alive(f"{name} {pid} {start}") is None
    assert lifetime.process_alive("") is None and lifetime.process_alive("garbage") is None


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare(1) to start a pid namespace")
def test_a_process_in_another_pid_namespace_is_not_read_as_one_of_ours(tmp_path):
    """A container's process 1 is not this host's process 1: its token names another host."""
    code = "from ecg_mlflow import lifetime; print(lifetime.process_token())"
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                          env=env(), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"unshare --pid needs privileges here: {proc.stderr.strip()[-200:]}")
    token = proc.stdout.strip().splitlines()[-1]
    host, pid, _ = token.split()
    assert pid == "1" and host != lifetime.host_id()
    assert lifetime.process_alive(token) is None  # pid 1 runs here too, but it is not that process


def test_orphaned_runs_are_ended_and_a_live_run_is_not_resumed(tmp_path, capsys):
    """A run whose process here is gone is marked KILLED with its children left RUNNING; a run whose
    process still runs, or ran on another host, or carries no process, is left as it is; a live
    run is not resumed."""
    from ecg_mlflow import resume

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("orphans")
    live = subprocess.Popen(["sleep", "300"])
    dead = subprocess.Popen(["true"])
    try:
        tokens = {"live": lifetime.process_token(live.pid), "dead": lifetime.process_token(dead.pid)}
        dead.wait()
        host, _, _ = tokens["live"].split()
        tokens["elsewhere"] = tokens["dead"].replace(host, host + "-elsewhere", 1)
        runs = {}
        for name in ("live", "dead", "elsewhere", "untagged"):
            tags = {"ecg.role": "loso", **({resume.PROCESS_TAG: tokens[name]} if name in tokens else {})}
            runs[name] = client.create_run(exp, run_name=name, tags=tags).info.run_id
        kids = {name: client.create_run(exp, run_name=f"{name}-base",
                                        tags={"mlflow.parentRunId": runs[name]}).info.run_id
                for name in ("live", "dead")}
        finished = client.create_run(exp, run_name="dead-done", tags={"mlflow.parentRunId": runs["dead"]}).info.run_id
        client.set_terminated(finished, "FINISHED")
        # a child tagged with a process that still runs (a nested run's LOSO run) ends by itself
        own = client.create_run(exp, run_name="dead-own", tags={"mlflow.parentRunId": runs["dead"],
                                                               resume.PROCESS_TAG: tokens["live"]}).info.run_id

        assert resume.end_orphaned_runs(client, exp) == [runs["dead"]]
        status = {r.info.run_name: r.info.status for r in client.search_runs([exp])}
        assert status == {"live": "RUNNING", "dead": "KILLED", "elsewhere": "RUNNING", "untagged": "RUNNING",
                          "live-base": "RUNNING", "dead-base": "KILLED", "dead-done": "FINISHED",
                          "dead-own": "RUNNING"}
        out = capsys.readouterr().out
        assert f"run dead ({runs['dead']}) was left RUNNING by process {dead.pid}, which is gone; marked KILLED; " \
               f"resume it with resume_run_id={runs['dead']}" in out
        assert resume.end_orphaned_runs(client, exp) == []  # nothing left to end
        # a run whose process is gone under a parent whose process is gone: ended once, not twice
        # (the child started first, so the newest-first search meets the parent first)
        inner = client.create_run(exp, run_name="inner", tags={resume.PROCESS_TAG: tokens["dead"]}).info.run_id
        time.sleep(0.01)
        outer = client.create_run(exp, run_name="outer", tags={resume.PROCESS_TAG: tokens["dead"]}).info.run_id
        client.set_tag(inner, "mlflow.parentRunId", outer)
        assert resume.end_orphaned_runs(client, exp) == [outer]
        assert {client.get_run(i).info.status for i in (outer, inner)} == {"KILLED"}
        assert capsys.readouterr().out.count(f"({inner})") == 1

        with pytest.raises(ValueError, match=rf"resume_run_id '{runs['live']}' is still running: process "
                                             rf"{live.pid} on this host .*kill {live.pid}"):
            resume.check_not_running(client.get_run(runs["live"]))
        resume.check_not_running(client.get_run(runs["dead"]))  # KILLED: resumable
        resume.check_not_running(client.get_run(runs["untagged"]))
        resume.check_not_running(client.get_run(runs["elsewhere"]))  # cannot tell: said, and allowed
        assert "which this host cannot see; resuming it as if that process had ended" in capsys.readouterr().out
    finally:
        live.kill()
        live.wait()
    # its process gone, the run that was live is ended, and so is the child that ran in that process
    assert sorted(resume.end_orphaned_runs(client, exp)) == sorted([runs["live"], own])
    assert client.get_run(kids["live"]).info.status == "KILLED"
