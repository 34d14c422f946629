"""The job runner: a tiny program between the agent and a job's command, which outlives the agent.

Run as ``python3 -I -S _runner.py`` (it imports nothing of the agent). Its standard output and
error are the job's output files, opened by the agent in append mode: the command inherits
them, so output reaches disk without passing through any process of ours, and the agent may
die. Descriptor 3 carries the spec (a ``marshal`` dump, then EOF: the runner runs under the
agent's own interpreter) from the agent; on descriptor 4 the runner answers the command's pid,
then closes it.

It imports only modules built into the interpreter: with ``json``, ``signal`` and
``contextlib`` (and the ``re``, ``enum`` and ``collections`` they pull in) a runner cost 21 ms
of CPU to start and end, without them 11 ms, and 200 jobs started (or ending) together cost
the machine that much less.

The runner makes itself a child subreaper and forks. The child enters the job's cgroup (writes
its own pid to ``cgroup.procs``) or, without one, makes a process group of its own, and only
then execs the command: nothing the command starts is outside. The runner stays outside the
cgroup, so it survives ``cgroup.kill`` and records the outcome: when the main process ends
(or the timeout fires, which kills the whole job), it writes ``exit`` (JSON: ``exit_code``,
``signal``, ``timed_out``, ``ended_at``) atomically, then kills whatever the command left
behind and reaps it (orphans are re-parented to the runner, the subreaper), then exits.
"""

from __future__ import annotations

import marshal
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal  # the C module itself: ``signal`` would import enum


def readSpec() -> Any:
    chunks = []
    while True:
        chunk = os.read(3, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(3)
    return marshal.loads(b"".join(chunks))  # noqa: S302 - from the agent that started us


def becomeSubreaper() -> None:
    """Orphans of the command come to the runner (best effort: otherwise to init)."""
    try:
        import ctypes  # noqa: PLC0415 - only here, the child never needs it

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:  # noqa: S110 - best effort, as said
        pass


def exitRecord(outcome: dict[str, Any]) -> bytes:
    """The ``exit`` file's JSON object (written by hand: ``json`` costs 9 ms to import)."""
    code = outcome["exit_code"]
    name = outcome["signal"]
    fields = [
        f'"exit_code": {"null" if code is None else int(code)}',
        # Signal names are ASCII letters and digits ("TERM", "RTMIN+1" is not one we name).
        f'"signal": {"null" if name is None else chr(34) + str(name) + chr(34)}',
        f'"timed_out": {"true" if outcome["timed_out"] else "false"}',
        f'"ended_at": {float(outcome["ended_at"])!r}',
    ]
    return ("{" + ", ".join(fields) + "}").encode("ascii")


def startCommand(spec: Any) -> int:
    """Fork the command; return its pid once it has entered the cgroup and exec'ed."""
    execed, failed = os.pipe()  # both close on exec: EOF tells the exec happened
    pid = os.fork()
    if pid:
        os.close(failed)
        while os.read(execed, 4096):
            pass
        os.close(execed)
        return pid
    try:
        os.close(execed)
        os.setpgid(0, 0)
        # The agent (and so the runner) asked the OOM killer to spare it; the job must not.
        try:
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write("0")
        except OSError:
            pass
        if spec.get("cgroup_procs"):
            fd = os.open(spec["cgroup_procs"], os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        for number in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(number, signal.SIG_DFL)
        argv = spec["argv"]
        os.execvpe(argv[0], argv, spec["env"])  # noqa: S606 - the job's own argv
    except BaseException as error:
        try:
            message = f"pyro job: cannot run {spec['argv'][0]}: {error}\n"
            os.write(2, message.encode("utf-8", "replace"))
        finally:
            os._exit(127)
    return 0  # not reached


def main() -> int:
    spec = readSpec()
    os.set_inheritable(4, False)
    becomeSubreaper()
    procs = spec.get("cgroup_procs")
    killFile = None if not procs else os.path.join(os.path.dirname(procs), "cgroup.kill")
    pid = startCommand(spec)
    # Only the command holds the stdin pipe: when it closes it (or ends), the agent's writes
    # fail at once and it drops what it had queued, rather than filling a pipe nobody reads.
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
            os.close(null)
    except OSError:
        pass
    try:
        os.write(4, f"{pid}\n".encode())
        os.close(4)
    except OSError:
        pass
    state = {"timed_out": False}

    def killAll() -> None:
        if killFile is not None:
            try:
                fd = os.open(killFile, os.O_WRONLY)
                os.write(fd, b"1")
                os.close(fd)
                return
            except OSError:
                pass
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as children:
                for child in children.read().split():
                    try:
                        os.kill(int(child), signal.SIGKILL)
                    except OSError:
                        pass
        except OSError:
            pass

    def timedOut(signum: int, frame: object) -> None:
        state["timed_out"] = True
        killAll()

    timeout = spec.get("timeout_seconds")
    if timeout:
        signal.signal(signal.SIGALRM, timedOut)
        signal.setitimer(signal.ITIMER_REAL, float(timeout))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
    signal.setitimer(signal.ITIMER_REAL, 0)
    ended = time.time()
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = spec.get("signal_names", {}).get(number, str(number))
        outcome: dict[str, Any] = {"exit_code": None, "signal": name}
    else:
        outcome = {"exit_code": os.waitstatus_to_exitcode(status), "signal": None}
    outcome.update(timed_out=state["timed_out"], ended_at=ended)
    path = spec["exit_path"]
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, exitRecord(outcome))
    os.close(fd)
    os.rename(temporary, path)
    # Whatever the main process left behind ends with it.
    while True:
        killAll()
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    return 0


if __name__ == "__main__":
    # No interpreter clean-up: everything was written with os.write, nothing is buffered.
    os._exit(main())
