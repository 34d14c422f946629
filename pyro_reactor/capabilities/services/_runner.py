"""The program a service's runner runs: the command, its capped logs, then its exit status.

The agent imports this module only to find it: ``NAME.runner.sh`` runs it as a script
(``python3 -I -S .../_runner.py``; see
L{pyro_reactor.capabilities.services.records.runnerScript}), and a running service keeps
working with whatever agent (or none) is running later. It must therefore use the standard
library only and work on its own.

The runner (the process the agent spawned, leader of the service's session and process group)
starts ``/bin/sh -lc COMMAND`` with its stdout and stderr on two pipes, forks a *log writer*
that copies each pipe to its log file, waits for the command, writes its exit status to
``NAME.status`` and exits with it. The log writer keeps at most the cap (``--log-bytes``)
per log file: once a file is full, it is renamed to ``NAME.stdout.1`` (replacing the
previous one) and a new one is started, so a stream never holds more than twice the cap, and
the two files always hold one contiguous end of the output.
The writer ignores SIGTERM, SIGHUP and SIGINT so that what the service prints while it shuts
down is still kept; it ends when every writer of its pipes is gone (the command and anything
it left running), or with the group's SIGKILL. A write that fails (a full state directory)
drops that chunk: the service never blocks on its logs.

Every file it creates is 0600. The command starts with every signal at its default action
(``posix_spawn`` with ``setsigdef``), and with the environment the runner was given:
Python's start-up may add ``LC_CTYPE`` (PEP 538 locale coercion), so the shell wrapper passes
the original value along and it is restored here before the command starts.
"""

import os
import select
import signal
import sys

CHUNK = 65536
#: The descriptor on which the agent hands the runner its working directory.
DIRECTORY_FD = 3


def _open(path: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class _Log:
    def __init__(self, path: str, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.fd = _open(path)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        # Fill the file up to the cap, rotate, go on: the two files always hold one
        # contiguous end of the stream.
        view = memoryview(data)[-2 * self.cap :]
        while view:
            if self.size >= self.cap and not self._rotate():
                return
            part = view[: self.cap - self.size]
            view = view[len(part) :]
            while part:
                try:
                    written = os.write(self.fd, part)
                except OSError:
                    return
                self.size += written
                part = part[written:]

    def _rotate(self) -> bool:
        try:
            os.replace(self.path, self.path + ".1")
            fd = _open(self.path)
        except OSError:
            return False
        os.close(self.fd)
        self.fd, self.size = fd, 0
        return True


def _copyLogs(streams: dict[int, str], cap: int) -> None:
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)
    logs = {fd: _Log(path, cap) for fd, path in streams.items()}
    while logs:
        try:
            ready, _, _ = select.select(list(logs), [], [])
        except InterruptedError:
            continue
        for fd in ready:
            try:
                data = os.read(fd, CHUNK)
            except OSError:
                data = b""
            if data:
                logs[fd].write(data)
            else:
                os.close(fd)
                os.close(logs.pop(fd).fd)


def main(argv: list[str]) -> int:
    # The agent checked and opened the directory; entering it through the descriptor does not
    # depend on the agent (nor on the name, which may have been swapped meanwhile).
    os.fchdir(DIRECTORY_FD)
    os.close(DIRECTORY_FD)
    command, stdoutPath, stderrPath, statusPath, cap, ctypeSet, ctype = argv[1:8]
    if ctypeSet:
        os.environ["LC_CTYPE"] = ctype
    else:
        os.environ.pop("LC_CTYPE", None)
    stdoutRead, stdoutWrite = os.pipe()
    stderrRead, stderrWrite = os.pipe()
    # Pipe descriptors are close-on-exec; dup2 onto 1 and 2 clears that for the copies only.
    child = os.posix_spawn(
        "/bin/sh",
        ["/bin/sh", "-lc", command],
        os.environ,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdoutWrite, 1),
            (os.POSIX_SPAWN_DUP2, stderrWrite, 2),
        ],
        setsigdef=sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}),
    )
    os.close(stdoutWrite)
    os.close(stderrWrite)
    if os.fork() == 0:
        try:
            _copyLogs({stdoutRead: stdoutPath, stderrRead: stderrPath}, int(cap))
        finally:
            os._exit(0)
    os.close(stdoutRead)
    os.close(stderrRead)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        code = 128 - code  # as a shell's $? after a signal
    try:
        fd = os.open(statusPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, str(code).encode())
        finally:
            os.close(fd)
    except OSError:
        pass
    return code & 0xFF


if __name__ == "__main__":
    sys.exit(main(sys.argv))
