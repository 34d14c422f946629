"""The job commands: ``run``, ``attach``, ``jobs``, ``kill``; Ctrl-C and stdin forwarding."""

from __future__ import annotations

import base64
import signal as _signal
import threading
from typing import Any

from pyro_reactor.client.commands.base import (
    EXIT_EXEC_CLIENT_FAILURE,
    EXIT_OK,
    CommandBase,
    Console,
    UsageError,
)
from pyro_reactor.client.commands.output import _binary, _jobLine
from pyro_reactor.client.commands.parser import _environment
from pyro_reactor.client.jobs import JobAttachment
from pyro_reactor.client.stdinpump import pumpStream


class JobCommands(CommandBase):
    """The job commands of L{Runner} (``run``, ``jobs``, ``attach``, ``kill``)."""

    async def do_run(self) -> int:
        words = list(self.options.words)
        if words and words[0] == "--":
            words = words[1:]
        if not words:
            raise UsageError("a command is required")
        start: dict[str, Any] = {
            "cwd": self.options.cwd,
            "env": _environment(self.options.env),
            "stdin": self.options.stdin,
            "timeoutSeconds": self.options.timeout_seconds,
            "jobId": self.options.job_id,
        }
        if len(words) == 1:
            start["command"] = words[0]
        else:
            start["argv"] = words
        if self.options.detach:
            answer = await self.client.startJob(
                start.pop("command", None), argv=start.pop("argv", None), **start
            )
            if self.options.json:
                self.emit(answer)
            else:
                self.say(str(answer["job_id"]))
            return EXIT_OK
        return await self._follow(start=start)

    async def do_attach(self) -> int:
        return await self._follow(
            jobId=self.options.job_id,
            stdoutOffset=self.options.stdout_offset,
            stderrOffset=self.options.stderr_offset,
        )

    async def _follow(self, **how: Any) -> int:
        out = _binary(self.console.stdout)
        err = _binary(self.console.stderr)

        def onEvent(event: dict[str, Any]) -> None:
            if self.options.json:
                self.emit(event)
                return
            kind = event.get("event")
            if kind == "output":
                target = out if event.get("stream") == "stdout" else err
                target.write(base64.b64decode(str(event.get("data", ""))))
                target.flush()
            elif kind == "gap":
                err.write(
                    f"[{event['offset']}..{event['resumed_at']} of {event['stream']}"
                    " no longer kept]\n".encode()
                )
            elif kind == "error":
                err.write(f"pyro-agent-client: {event.get('error')}\n".encode())

        encoding = "text" if self.options.json else "base64"
        attachment = await self.client.attachJob(onEvent=onEvent, encoding=encoding, **how)
        if self.options.json and attachment.header is not None:
            self.emit(attachment.header)
        previous = _forwardInterrupts(self.reactor, attachment)
        try:
            if getattr(self.options, "stdin", False):
                _forwardStdin(self.reactor, self.console, attachment)
            exit_ = await attachment.done
        finally:
            if previous is not None:
                _signal.signal(_signal.SIGINT, previous)
        out.flush()
        err.flush()
        if exit_ is None:
            self.console.stderr.write("pyro-agent-client: the stream ended before the job\n")
            return EXIT_EXEC_CLIENT_FAILURE
        if exit_.get("exit_code") is not None:
            return int(exit_["exit_code"]) & 0xFF
        name = exit_.get("signal")
        number = getattr(_signal, f"SIG{name}", None) if isinstance(name, str) else None
        return 128 + int(number) if number is not None else EXIT_EXEC_CLIENT_FAILURE

    async def do_jobs(self) -> int:
        jobs = await self.client.listJobs()
        for job in jobs:
            if self.options.json:
                self.emit(job)
            else:
                self.say(_jobLine(job))
        return EXIT_OK

    async def do_kill(self) -> int:
        answer = await self.client.signalJob(self.options.job_id, self.options.signal)
        if self.options.json:
            self.emit(answer)
        return EXIT_OK


def _forwardInterrupts(reactor: Any, attachment: Any) -> Any:
    """Ctrl-C sends INT to the job instead of ending the client (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupted(signum: int, frame: object) -> None:
        reactor.callFromThread(attachment.signal, "INT")

    return _signal.signal(_signal.SIGINT, interrupted)


def _forwardStdin(reactor: Any, console: Console, attachment: JobAttachment) -> None:
    """Copy the local stdin to the job's, as fast as the connection takes it, then close it
    (EOF). Reading waits while the connection is full, so memory stays bounded."""
    pumpStream(reactor, getattr(console.stdin, "buffer", None) or console.stdin, attachment)
