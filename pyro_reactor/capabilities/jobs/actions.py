"""The job actions: every field checked before anything starts, then handed to L{Jobs}.

``start_job``, ``attach_job`` (a L{HandOff} to L{AttachStream}), ``read_job``, ``write_job``,
``signal_job``, ``status_job``, ``list_jobs``, ``remove_job``; see docs/actions/jobs.md.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import shutil
import signal as _signal
from collections.abc import Sequence
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall

from pyro_reactor.capabilities.execute import SHELL, commandEnvironment
from pyro_reactor.capabilities.jobs.attach import AttachStream
from pyro_reactor.capabilities.jobs.registry import Job, Jobs, JobSpec, newJobId
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.cgroups import LimitError, parseLimits
from pyro_reactor.wire.dispatch import Action, HandOff
from pyro_reactor.wire.request import Request

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SIGNALS = {
    name: getattr(_signal, f"SIG{name}")
    for name in ("HUP", "INT", "QUIT", "TERM", "KILL", "USR1", "USR2", "STOP", "CONT")
}
DEFAULT_READ_BYTES = 1024 * 1024
MAX_READ_BYTES = 16 * 1024 * 1024
MAX_WAIT_MS = 60_000
MAX_OFFSET = 2**62


def jobIdOf(request: Request) -> str:
    if not request.has("job_id"):
        raise ActionError("job_id is required")
    jobId = request.string("job_id")
    if JOB_ID_RE.fullmatch(jobId) is None or jobId in (".", ".."):
        raise ActionError("job_id must be 1 to 64 of A-Z a-z 0-9 . _ -")
    return jobId


def signalOf(name: object) -> tuple[str, int]:
    if not isinstance(name, str):
        raise ActionError('signal must be a string such as "TERM"')
    short = name.upper().removeprefix("SIG")
    if short not in SIGNALS:
        raise ActionError(f"unknown signal {name!r} (known: {', '.join(SIGNALS)})")
    return short, SIGNALS[short]


def offsetOf(request: Request, name: str) -> int:
    value = request.integer(name, 0)
    if value < 0 or value > MAX_OFFSET:
        raise ActionError(f"{name} must be between 0 and {MAX_OFFSET}")
    return value


def encodingOf(request: Request) -> str:
    encoding = request.string("encoding", "text")
    if encoding not in ("text", "base64"):
        raise ActionError('encoding must be "text" or "base64"')
    return encoding


def parseStart(request: Request, workspace: Any) -> tuple[JobSpec, bool]:
    """Check a ``start_job`` request completely; the spec and whether to attach."""
    hasCommand, hasArgv = request.has("command"), request.has("argv")
    if hasCommand == hasArgv:
        raise ActionError("give exactly one of command (a shell command line) or argv (a list)")
    shown: dict[str, Any]
    if hasCommand:
        command = request.string("command")
        if "\x00" in command:
            raise ActionError("command must not contain NUL bytes")
        _checkText(command, "command")
        argv = [SHELL, "-lc", command]
        shown = {"command": command}
    else:
        raw = request.fields.get("argv")
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ActionError("argv must be a list of strings")
        if not raw:
            raise ActionError("argv must not be empty")
        for item in raw:
            if "\x00" in item:
                raise ActionError("argv items must not contain NUL bytes")
            _checkText(item, "argv")
        if raw[0] == "":
            raise ActionError("argv[0] must not be empty")
        argv = list(raw)
        shown = {"argv": argv}
    cwd = workspace.resolve(request.string("cwd", "/workspace")).text
    env = commandEnvironment(request.environment("job"))
    if hasArgv and "/" not in argv[0] and shutil.which(argv[0], path=env.get("PATH")) is None:
        raise ActionError(f"command not found: {argv[0]!r}")
    stdin = request.boolean("stdin", False)
    timeout: float | None = None
    if request.has("timeout_seconds"):
        value = request.fields["timeout_seconds"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ActionError("timeout_seconds must be a number")
        if not 0 < value <= 10**9:
            raise ActionError("timeout_seconds must be greater than 0 (and at most 10**9)")
        timeout = float(value)
    jobId = jobIdOf(request) if request.has("job_id") else newJobId()
    try:
        limits = parseLimits(request.mapping("limits"))
    except LimitError as error:
        raise ActionError(str(error)) from None
    attach = request.boolean("attach", False)
    return JobSpec(jobId, argv, shown, cwd, env, stdin, timeout, limits), attach


def _checkText(text: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ActionError(f"{name} must be valid Unicode text") from None


def startAnswer(job: Job) -> dict[str, Any]:
    record = job.record
    return {
        "job_id": job.jobId,
        "pid": record.get("pid"),
        "state": "running",
        "started_at": record.get("started_at"),
        "cgroup": bool(record.get("cgroup")),
        "limits_applied": record.get("limits_applied", {}),
    }


class JobActions:
    """The request handlers of the job actions."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.workspace = jobs.context.workspace

    def _job(self, request: Request) -> Job:
        return self.jobs.get(jobIdOf(request))

    def start(self, request: Request) -> Deferred[dict[str, Any]] | Deferred[Any]:
        spec, attach = parseStart(request, self.workspace)
        encoding = encodingOf(request)
        started = self.jobs.start(spec)
        if not attach:
            return started.addCallback(startAnswer)

        def handOff(job: Job) -> HandOff:
            return HandOff(
                startAnswer(job),
                AttachStream(self.jobs, job, 0, 0, encoding, self.jobs.context.budget),
            )

        return started.addCallback(handOff)

    def attach(self, request: Request) -> HandOff:
        job = self._job(request)
        stdout, stderr = offsetOf(request, "stdout_offset"), offsetOf(request, "stderr_offset")
        encoding = encodingOf(request)
        job.output.refresh()
        for name, offset in (("stdout", stdout), ("stderr", stderr)):
            if offset > job.output.streams[name].size:
                raise ActionError(
                    f"{name}_offset {offset} is beyond the {job.output.streams[name].size}"
                    f" bytes {name} has produced"
                )
        header = {"job_id": job.jobId, "state": job.machine.state(), "attached": True}
        return HandOff(
            header, AttachStream(self.jobs, job, stdout, stderr, encoding, self.jobs.context.budget)
        )

    def read(self, request: Request) -> Deferred[dict[str, Any]]:
        job = self._job(request)
        offsets = {
            "stdout": offsetOf(request, "stdout_offset"),
            "stderr": offsetOf(request, "stderr_offset"),
        }
        maxBytes = request.integer("max_bytes", DEFAULT_READ_BYTES)
        if not 1 <= maxBytes <= MAX_READ_BYTES:
            raise ActionError(f"max_bytes must be between 1 and {MAX_READ_BYTES}")
        waitMs = request.integer("wait_ms", 0)
        if not 0 <= waitMs <= MAX_WAIT_MS:
            raise ActionError(f"wait_ms must be between 0 and {MAX_WAIT_MS}")
        encoding = encodingOf(request)
        if encoding == "text" and maxBytes < 4:
            # Fewer bytes than one character may need would never advance the offsets.
            raise ActionError("max_bytes must be at least 4 with encoding text")
        output = job.output
        output.refresh()
        for name, offset in offsets.items():
            if offset > output.streams[name].size:
                raise ActionError(
                    f"{name}_offset {offset} is beyond the {output.streams[name].size} bytes"
                    f" {name} has produced"
                )

        def nothingNew() -> bool:
            return job.machine.state() == "running" and all(
                offsets[name] >= output.streams[name].size for name in offsets
            )

        waited: Deferred[None] = succeed(None)
        if waitMs and nothingNew():
            waited = _waitForChange(self.jobs.reactor, job, waitMs / 1000)
        return waited.addCallback(lambda _: self._read(job, offsets, maxBytes, encoding))

    def _read(
        self, job: Job, offsets: dict[str, int], maxBytes: int, encoding: str
    ) -> Deferred[dict[str, Any]]:
        output = job.output
        ended = job.machine.state() == "exited"
        answer: dict[str, Any] = {"job_id": job.jobId, "state": job.machine.state(), "gap": False}
        reads: list[tuple[str, int, int]] = []
        for name in ("stdout", "stderr"):
            stream = output.streams[name]
            offset = offsets[name]
            if offset < stream.start:
                offset = stream.start
                answer["gap"] = True
            count = min(maxBytes, stream.size - offset)
            reads.append((name, offset, max(count, 0)))

        def readAll() -> list[bytes]:
            from pyro_reactor.capabilities.jobs import records  # noqa: PLC0415

            return [
                records.readAt(output.streams[name].fd, offset, count) if count else b""
                for name, offset, count in reads
            ]

        def done(chunks: list[bytes]) -> dict[str, Any]:
            atEnd = True
            for (name, offset, _), data in zip(reads, chunks, strict=True):
                size = output.streams[name].size
                final = ended and offset + len(data) >= size
                if encoding == "base64":
                    answer[name] = base64.b64encode(data).decode("ascii")
                    used = len(data)
                else:
                    answer[name], used = decodeText(data, final)
                answer[f"{name}_offset"] = offset + used
                atEnd = atEnd and offset + used >= size
            answer["exit"] = job.exitInfo() if ended and atEnd else None
            return answer

        if not any(count for _, _, count in reads):
            return succeed(done([b"", b""]))
        result: Deferred[list[bytes]] = self.jobs.context.inThread(readAll)
        return result.addCallback(done)

    def write(self, request: Request) -> dict[str, Any]:
        job = self._job(request)
        close = request.boolean("close_stdin", False)
        if request.has("data") and request.has("data_base64"):
            raise ActionError("give data or data_base64, not both")
        if request.has("data"):
            text = request.string("data")
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                raise ActionError("data must be valid Unicode text") from None
        elif request.has("data_base64"):
            data = decodeBase64(request.string("data_base64"), "data_base64")
        elif close:
            data = b""
        else:
            raise ActionError("give data, data_base64 or close_stdin")
        written = job.write(data, close)
        return {"job_id": job.jobId, "written": written}

    def signal(self, request: Request) -> dict[str, Any]:
        job = self._job(request)
        name, number = signalOf(request.fields.get("signal"))
        if not self.jobs.signal(job, number):
            raise ActionError(f"job {job.jobId!r} has ended")
        return {"job_id": job.jobId, "signal": name}

    def status(self, request: Request) -> dict[str, Any]:
        job = self._job(request)
        job.output.refresh()
        return job.status()

    def list(self, request: Request) -> dict[str, Any]:
        return {"jobs": [job.status() for job in self.jobs.jobs.values() if isinstance(job, Job)]}

    def remove(self, request: Request) -> Deferred[dict[str, Any]]:
        job = self._job(request)
        force = request.boolean("force", False)
        return self.jobs.remove(job, force).addCallback(
            lambda _: {"job_id": job.jobId, "removed": True}
        )


def decodeBase64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ActionError(f"{name} is not valid base64") from None


def decodeText(data: bytes, final: bool) -> tuple[str, int]:
    """UTF-8 text of C{data} (U+FFFD for bad bytes), and how many bytes it covers.

    An incomplete character at the end is left for the next read, unless C{final}.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text = decoder.decode(data, final)
    pending = len(decoder.getstate()[0])
    return text, len(data) - pending


def _waitForChange(reactor: Any, job: Job, seconds: float) -> Deferred[None]:
    waiter: Deferred[None] = Deferred()
    timer: list[IDelayedCall] = []

    def wake() -> None:
        if not waiter.called:
            if timer and timer[0].active():
                timer[0].cancel()
            waiter.callback(None)

    def timeout() -> None:
        job.output.unlisten(wake)
        if not waiter.called:
            waiter.callback(None)

    job.output.listen(wake)
    job.machine.whenEnded().addCallback(lambda _: wake())
    timer.append(reactor.callLater(seconds, timeout))
    return waiter


class _JobFreezer:
    """What ``quiesce``/``thaw`` freeze of the jobs: every running job's cgroup."""

    def __init__(self, jobs: Jobs) -> None:
        self._jobs = jobs

    def freeze(self) -> Deferred[int]:
        return succeed(len(self._jobs.freeze()))

    def thaw(self) -> Deferred[int]:
        return succeed(len(self._jobs.thaw()))


class JobsCapability:
    """Jobs: durable, streaming processes (``start_job`` and friends)."""

    def __init__(self, context: AgentContext) -> None:
        self.jobs = Jobs(context)
        handlers = JobActions(self.jobs)
        self.actions: Sequence[Action] = (
            Action("start_job", handlers.start),
            Action("attach_job", handlers.attach),
            Action("read_job", handlers.read),
            Action("write_job", handlers.write),
            Action("signal_job", handlers.signal),
            Action("status_job", handlers.status),
            Action("list_jobs", handlers.list),
            Action("remove_job", handlers.remove),
        )
        self.service: IService | None = self.jobs
        jobs = self.jobs
        context.hooks.freezables.append(_JobFreezer(jobs))
        context.hooks.counts["jobs"] = lambda: sum(
            1 for job in jobs.jobs.values() if job.machine.state() == "running"
        )
        context.hooks.usage["jobs"] = lambda: [
            {"job_id": status["job_id"], "state": status["state"], "usage": status["usage"]}
            for status in (job.status() for job in jobs.jobs.values())
        ]

    @property
    def features(self) -> Sequence[str]:
        return ("jobs", "cgroups") if self.jobs.cgroupsWork else ("jobs",)
